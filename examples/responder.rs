//! A desktop service that answers browser requests (`{"op":"request",...}`) through deskbridge.
//!
//! ```text
//! cargo run --example responder -- [exchange] [routing key]    # defaults: bwic A_new_example
//! ```
//!
//! It binds a private queue to the bridge's outbound exchange with the request's key, and
//! answers each request on its `reply_to` queue (default exchange) with the same
//! `correlation_id`: that is all a responder has to do. `AMQP_URL` picks the broker.

use amiquip::{
    AmqpProperties, Connection, ConsumerMessage, ConsumerOptions, ExchangeDeclareOptions, ExchangeType,
    FieldTable, Publish, QueueDeclareOptions, Result,
};
use serde_json::{json, Value};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let exchange = args.next().unwrap_or_else(|| "bwic".into());
    let key = args.next().unwrap_or_else(|| "A_new_example".into());
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into());

    let mut connection = Connection::insecure_open(&url)?;
    let channel = connection.open_channel(None)?;
    // Declared as the bridge declares it, so either may start first.
    let options = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let outbound = channel.exchange_declare(ExchangeType::Direct, exchange.as_str(), options)?;
    let private = QueueDeclareOptions {
        exclusive: true,
        ..QueueDeclareOptions::default()
    };
    let queue = channel.queue_declare("", private)?;
    queue.bind(&outbound, key.as_str(), FieldTable::new())?;
    let consumer = queue.consume(ConsumerOptions::default())?;
    println!("answering requests for `{key}` on exchange `{exchange}` (Ctrl-C stops)");

    for message in consumer.receiver() {
        let ConsumerMessage::Delivery(request) = message else {
            break;
        };
        let question: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        if let Some(reply_to) = request.properties.reply_to() {
            let answer = json!({"answer": question, "by": "examples/responder"});
            let mut properties = AmqpProperties::default().with_content_type("application/json".into());
            if let Some(id) = request.properties.correlation_id() {
                properties = properties.with_correlation_id(id.clone());
            }
            let body = answer.to_string();
            channel.basic_publish(
                "",
                Publish::with_properties(body.as_bytes(), reply_to.as_str(), properties),
            )?;
            println!("answered {:?}", request.properties.correlation_id());
        }
        consumer.ack(request)?;
    }
    connection.close()
}
