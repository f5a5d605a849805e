//! The gateway core of `latssiam-bridge`. Today it holds the gateway's durable
//! TOFU pin store; the queue, routing, contacts, delivery worker and ACCEPT
//! poller arrive with the email gateway (ARCHITECTURE.md).

pub mod gateway;
pub mod local;
pub mod pins;
