//! The command line, one file per command family: argument parsing and
//! printing; the work is done by the library (`latssiam`, the gateway core).

pub mod dkim;
pub mod gateway;
pub mod local;
pub mod net;
pub mod qr;
pub mod sendmail;
pub mod server;
pub mod toolkit;
