//! Models: Mimi today; the delayed-streams language models next.

pub mod mimi;
pub mod weights;
