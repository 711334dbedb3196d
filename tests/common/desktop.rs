//! The desktop app's side: `Desktop` publishes, `Listener` consumes (amiquip, blocking).

use std::thread::JoinHandle;

use amiquip::{AmqpProperties, Connection, ConsumerMessage, Delivery, ExchangeType, FieldTable, Publish};
use serde_json::Value;

use super::amqp::{broker, connect, consume_unacked, private_queue, private_queue_of};
use super::DEADLINE;

/// A desktop app: publishes with amiquip.
pub struct Desktop {
    connection: Connection,
}

impl Desktop {
    pub fn connect() -> Desktop {
        Desktop { connection: broker() }
    }

    /// A desktop app on another broker than the tests' (a private node).
    pub fn connect_to(url: &str) -> Desktop {
        Desktop {
            connection: connect(url, "Is the private node still running?"),
        }
    }

    /// Publishes `body` to `exchange` with `key` and the given properties, and waits for the
    /// broker's confirm so the test knows it is in the queue.
    pub fn publish_with(&mut self, exchange: &str, key: &str, body: &[u8], properties: AmqpProperties) {
        let channel = self.connection.open_channel(None).expect("channel");
        let confirms = channel.listen_for_publisher_confirms().expect("confirms");
        channel.enable_publisher_confirms().expect("confirm mode");
        channel
            .basic_publish(exchange, Publish::with_properties(body, key, properties))
            .expect("publish");
        confirms
            .recv_timeout(DEADLINE)
            .expect("broker confirms the desktop publish");
        let _ = channel.close();
    }

    /// Publishes many JSON bodies on one channel, then waits for all confirms.
    pub fn publish_many(&mut self, exchange: &str, messages: &[(String, Value)]) {
        let messages: Vec<(String, Value, AmqpProperties)> = messages
            .iter()
            .map(|(key, body)| (key.clone(), body.clone(), AmqpProperties::default()))
            .collect();
        self.publish_many_with(exchange, &messages);
    }

    /// Publishes many JSON bodies with their properties on one channel, back to back, then
    /// waits for all confirms.
    pub fn publish_many_with(&mut self, exchange: &str, messages: &[(String, Value, AmqpProperties)]) {
        let channel = self.connection.open_channel(None).expect("channel");
        let confirms = channel.listen_for_publisher_confirms().expect("confirms");
        channel.enable_publisher_confirms().expect("confirm mode");
        for (key, body, properties) in messages {
            let body = serde_json::to_vec(body).expect("json");
            channel
                .basic_publish(
                    exchange,
                    Publish::with_properties(&body, key.as_str(), properties.clone()),
                )
                .expect("publish");
        }
        let mut smoother = amiquip::ConfirmSmoother::new();
        let mut confirmed = 0;
        while confirmed < messages.len() {
            let confirm = confirms.recv_timeout(DEADLINE).expect("broker confirms");
            confirmed += smoother.process(confirm).count();
        }
        let _ = channel.close();
    }

    pub fn publish_json(&mut self, exchange: &str, key: &str, body: &Value) {
        let bytes = serde_json::to_vec(body).expect("json");
        self.publish_with(exchange, key, &bytes, AmqpProperties::default());
    }

    /// Binds an extra key to a queue (to let bad routing keys reach the bridge).
    pub fn bind(&mut self, queue: &str, exchange: &str, key: &str) {
        let channel = self.connection.open_channel(None).expect("channel");
        channel
            .queue_bind(queue, exchange, key, FieldTable::new())
            .expect("bind");
        let _ = channel.close();
    }
}

/// A desktop app listening on an exchange: an exclusive queue consumed on its own thread.
pub struct Listener {
    /// The queue's name (broker-named unless `existing`): a desktop app's `reply_to`.
    pub queue: String,
    deliveries: crossbeam_channel::Receiver<Delivery>,
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Declares `exchange` (direct, durable, as the bridge does), binds an exclusive queue with
    /// each key, and returns once consuming.
    pub fn bind(exchange: &str, keys: &[&str]) -> Listener {
        Listener::queue(None, (ExchangeType::Direct, exchange), None, keys)
    }

    /// `bind` to a topic exchange (presence), with binding patterns for keys.
    pub fn bind_topic(exchange: &str, keys: &[&str]) -> Listener {
        Listener::queue(None, (ExchangeType::Topic, exchange), None, keys)
    }

    /// `bind` on another broker than the tests' (a private node).
    pub fn bind_at(url: &str, exchange: &str, keys: &[&str]) -> Listener {
        Listener::queue(
            Some(url.to_string()),
            (ExchangeType::Direct, exchange),
            None,
            keys,
        )
    }

    /// Consumes an existing queue (e.g. a dead-letter queue).
    pub fn existing(queue: &str) -> Listener {
        Listener::queue(None, (ExchangeType::Direct, ""), Some(queue.to_string()), &[])
    }

    /// `existing` on another broker than the tests' (a private node).
    pub fn existing_at(url: &str, queue: &str) -> Listener {
        Listener::queue(
            Some(url.to_string()),
            (ExchangeType::Direct, ""),
            Some(queue.to_string()),
            &[],
        )
    }

    fn queue(
        url: Option<String>,
        (kind, exchange): (ExchangeType, &str),
        existing: Option<String>,
        keys: &[&str],
    ) -> Listener {
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let (tx, deliveries) = crossbeam_channel::unbounded();
        let (stop, stop_rx) = crossbeam_channel::bounded::<()>(1);
        let exchange = exchange.to_string();
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        let thread = std::thread::spawn(move || {
            let mut connection = match url {
                Some(url) => connect(&url, "Is the private node still running?"),
                None => broker(),
            };
            let channel = connection.open_channel(None).expect("channel");
            let queue = match existing {
                Some(name) => channel.queue_declare_passive(name).expect("queue exists"),
                None => {
                    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                    private_queue_of(&channel, kind, &exchange, &keys)
                }
            };
            let consumer = consume_unacked(&queue);
            ready_tx.send(queue.name().to_string()).expect("test waits");
            loop {
                crossbeam_channel::select! {
                    recv(consumer.receiver()) -> message => match message {
                        Ok(ConsumerMessage::Delivery(delivery)) => { let _ = tx.send(delivery); }
                        _ => break,
                    },
                    recv(stop_rx) -> _ => break,
                }
            }
            let _ = connection.close();
        });
        let queue = ready_rx
            .recv_timeout(DEADLINE)
            .expect("listener starts consuming");
        Listener {
            queue,
            deliveries,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The next delivery, or fails the test.
    pub fn next(&self) -> Delivery {
        tokio::task::block_in_place(|| self.deliveries.recv_timeout(DEADLINE))
            .expect("a delivery arrives before the deadline")
    }

    /// How many deliveries are already waiting.
    pub fn waiting(&self) -> usize {
        self.deliveries.len()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A desktop service answering requests: each delivery on `keys` of `exchange` that has a
/// `reply_to` is answered there with `answer(request)` and the request's `correlation_id`,
/// as a responder written with amiquip would.
pub struct Responder {
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Responder {
    pub fn start(
        exchange: &str,
        keys: &[&str],
        answer: impl Fn(&Delivery) -> Vec<u8> + Send + 'static,
    ) -> Responder {
        Responder::spawn(None, exchange, keys, answer)
    }

    /// `start` on another broker than the tests' (the bench node).
    pub fn start_at(
        url: &str,
        exchange: &str,
        keys: &[&str],
        answer: impl Fn(&Delivery) -> Vec<u8> + Send + 'static,
    ) -> Responder {
        Responder::spawn(Some(url.to_string()), exchange, keys, answer)
    }

    fn spawn(
        url: Option<String>,
        exchange: &str,
        keys: &[&str],
        answer: impl Fn(&Delivery) -> Vec<u8> + Send + 'static,
    ) -> Responder {
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let (stop, stop_rx) = crossbeam_channel::bounded::<()>(1);
        let exchange = exchange.to_string();
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        let thread = std::thread::spawn(move || {
            let mut connection = match url {
                Some(url) => connect(&url, "Is that broker running?"),
                None => broker(),
            };
            let channel = connection.open_channel(None).expect("channel");
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            let queue = private_queue(&channel, &exchange, &keys);
            let consumer = consume_unacked(&queue);
            ready_tx.send(()).expect("test waits");
            loop {
                crossbeam_channel::select! {
                    recv(consumer.receiver()) -> message => match message {
                        Ok(ConsumerMessage::Delivery(request)) => {
                            let Some(reply_to) = request.properties.reply_to().clone() else { continue };
                            let mut properties = AmqpProperties::default();
                            if let Some(id) = request.properties.correlation_id() {
                                properties = properties.with_correlation_id(id.clone());
                            }
                            let body = answer(&request);
                            channel
                                .basic_publish("", Publish::with_properties(&body, reply_to, properties))
                                .expect("reply");
                        }
                        _ => break,
                    },
                    recv(stop_rx) -> _ => break,
                }
            }
            let _ = connection.close();
        });
        ready_rx
            .recv_timeout(DEADLINE)
            .expect("responder starts consuming");
        Responder {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
