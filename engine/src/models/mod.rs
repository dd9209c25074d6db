//! Models: Mimi today; the delayed-streams language models next.

pub mod kyutai_config;
pub mod lm;
pub mod mimi;
pub mod stt;
pub mod tokenizer;
pub mod transformer;
pub mod weights;
