//! The four actors and the typed messages between them.
//!
//! ```text
//!  browser ⇄ WsSession ──FromSession──────▶ Router ──PublishJob──▶ AmqpPublisher ⇄ RabbitMQ (bwic)
//!             ▲                               │ ▲                        │
//!             └───frames (Outbox → Lane)──────┘ └────PublishOutcomes─────┘
//!                                               │ ▲
//!                                       Verdict │ │ DesktopBatch
//!                                               ▼ │
//!  RabbitMQ (example → listener) ⇄ AmqpConsumer ──┘
//! ```
//!
//! `Router` and `WsSession` are actix actors. The two AMQP actors are threads with crossbeam
//! channels ([`worker`]): amiquip is blocking and a `Channel` must stay on the thread that
//! opened it, so they live off the async runtime and reach the router through `Recipient`s.
//! Every message and handle is defined in [`messages`]; no actor file imports another.

pub mod amqp_consumer;
pub mod amqp_publisher;
pub mod messages;
pub mod router;
pub mod session;
pub mod stream_reader;
pub mod worker;
