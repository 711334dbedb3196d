//! A desktop app that sends one browser session a command and waits for its answer.
//!
//! ```text
//! cargo run --example ask_browser -- <session id from the browser's welcome> [exchange] [key]
//! ```
//!
//! The message goes to the bridge's inbound exchange (default `example`, key `A_new_example`)
//! with `x-to-session`, a `reply_to` queue of its own and a `correlation_id`. The browser gets
//! it as an `event` with `reply_id`; its `reply` comes back here. `AMQP_URL` picks the broker.

use std::time::Duration;

use amiquip::{
    AmqpProperties, AmqpValue, Connection, ConsumerMessage, ConsumerOptions, FieldTable, Publish,
    QueueDeclareOptions,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let session = args
        .next()
        .ok_or("usage: ask_browser <session id> [exchange] [routing key]")?;
    let exchange = args.next().unwrap_or_else(|| "example".into());
    let key = args.next().unwrap_or_else(|| "A_new_example".into());
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into());

    let mut connection = Connection::insecure_open(&url)?;
    let channel = connection.open_channel(None)?;
    let private = QueueDeclareOptions {
        exclusive: true,
        ..QueueDeclareOptions::default()
    };
    let answers = channel.queue_declare("", private)?;
    let consumer = answers.consume(ConsumerOptions {
        no_ack: true,
        ..ConsumerOptions::default()
    })?;

    let correlation_id = format!("ask-{}", std::process::id());
    let mut headers = FieldTable::new();
    headers.insert("x-to-session".into(), AmqpValue::LongString(session.clone()));
    let properties = AmqpProperties::default()
        .with_content_type("application/json".into())
        .with_headers(headers)
        .with_reply_to(answers.name().to_string())
        .with_correlation_id(correlation_id.clone());
    let body = br#"{"question":"confirm trade 42?"}"#;
    channel.basic_publish(
        exchange.as_str(),
        Publish::with_properties(body, key.as_str(), properties),
    )?;
    println!("asked session {session}; waiting up to 60 s for its reply");

    match consumer.receiver().recv_timeout(Duration::from_secs(60)) {
        Ok(ConsumerMessage::Delivery(answer)) => {
            let from = answer
                .properties
                .headers()
                .as_ref()
                .and_then(|headers| headers.get("x-session"))
                .cloned();
            println!(
                "answer {} (correlation_id {:?}, x-session {from:?})",
                String::from_utf8_lossy(&answer.body),
                answer.properties.correlation_id()
            );
        }
        _ => println!("no answer within 60 s (is the session connected to this bridge?)"),
    }
    connection.close()?;
    Ok(())
}
