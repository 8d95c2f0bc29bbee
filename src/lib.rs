//! cronpost: a SQLite-backed webhook dispatcher. Producers publish messages
//! into one SQLite file; a scheduled parent process forks short-lived
//! children; each child leases one delivery and POSTs it to its endpoint.
//!
//! ARCHITECTURE.md maps the modules and the life of a delivery.

#![warn(missing_docs)]

pub mod adaptive;
pub mod admin;
pub mod child;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod delivery;
pub mod demo;
pub mod dispatcher;
pub mod enqueue;
pub mod error;
pub mod files;
pub mod forking;
pub mod ids;
pub mod keeper;
pub mod lease;
pub mod metrics;
pub mod preflight;
pub mod receiver;
pub mod retention;
pub mod routing;
pub mod saturation;
pub mod signals;
pub mod signature;
pub mod slots;
pub mod steps;
pub mod store;
pub mod watch;
pub mod words;
