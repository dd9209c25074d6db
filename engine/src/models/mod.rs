//! Models: Mimi, the delayed-streams language models, their tokenizer, and the checkpoint
//! files they load from.

pub mod checkpoint;
pub mod kyutai_config;
pub mod lm;
pub mod mimi;
pub mod smart_turn;
pub mod stt;
pub mod tokenizer;
pub mod transformer;
pub mod tts;
pub mod vad;
pub mod weights;
