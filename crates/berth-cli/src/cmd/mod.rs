//! The client commands, one file per group; each takes a [`crate::client::Client`] (or makes
//! one from its `Conn`) and prints for a human or, with `--json`, for a program.

pub(crate) mod boxes;
pub(crate) mod keys;
pub(crate) mod mock_model;
pub(crate) mod node;
pub(crate) mod run;
pub(crate) mod sessions;
pub(crate) mod usage;
