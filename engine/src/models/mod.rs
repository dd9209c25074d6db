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

/// Reads the JSON config `path` as a `T`: an error naming the file when it is not UTF-8
/// text, not JSON, not a JSON object, or has a field of the wrong type.
pub(crate) fn read_json_config<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
) -> crate::Result<T> {
    let bytes = std::fs::read(path).map_err(|e| crate::Error::io(path, e))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| crate::Error::config(path, format!("not UTF-8 text: {e}")))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| crate::Error::config(path, format!("not JSON: {e}")))?;
    if !value.is_object() {
        return Err(crate::Error::config(
            path,
            "not a JSON object (a config is `{ \"key\": value, ... }`)",
        ));
    }
    serde_json::from_value(value).map_err(|e| crate::Error::config(path, e))
}
