//! Parley's engine: everything but the windows. See ARCHITECTURE.md for who owns what.

pub mod audio;
pub mod compute;
pub mod error;
pub mod hub;
pub mod llm;
pub mod models;
pub mod npy;
pub mod outfile;
pub mod pipeline;
pub mod profile;

pub use error::{Error, Result};
