//! Frame sources and sinks made of channels: audio that arrives in pieces of any size
//! (headless stdin), and output frames that leave as events.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::Event;
use crate::audio::{FrameSink, FrameSource, FRAME_LEN_SAMPLES};
use crate::{Error, Result};

/// 24 kHz mono samples arriving in pieces of any length on a channel, cut into 80 ms
/// frames. When the sender goes away the last partial frame is padded with silence and
/// the input ends.
#[derive(Debug)]
pub struct PcmSource {
    rx: Receiver<Vec<f32>>,
    pending: Vec<f32>,
    ended: bool,
    end: Option<Arc<AtomicBool>>,
}

impl PcmSource {
    pub fn new(rx: Receiver<Vec<f32>>) -> Self {
        Self {
            rx,
            pending: Vec::with_capacity(4 * FRAME_LEN_SAMPLES),
            ended: false,
            end: None,
        }
    }

    /// The input also ends when `end` is set while no audio waits (a signal handler's
    /// way: the sender may be held by a thread blocked on its own input).
    pub fn ending_on(mut self, end: Arc<AtomicBool>) -> Self {
        self.end = Some(end);
        self
    }
}

impl FrameSource for PcmSource {
    fn next_frame(&mut self, frame: &mut [f32; FRAME_LEN_SAMPLES]) -> Result<bool> {
        while self.pending.len() < FRAME_LEN_SAMPLES && !self.ended {
            match self.rx.recv_timeout(std::time::Duration::from_millis(50)) {
                Ok(chunk) => self.pending.extend_from_slice(&chunk),
                Err(RecvTimeoutError::Timeout) => {
                    if self.end.as_ref().is_some_and(|e| e.load(Ordering::SeqCst)) {
                        self.ended = true;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => self.ended = true,
            }
        }
        if self.pending.is_empty() {
            return Ok(false);
        }
        let n = self.pending.len().min(FRAME_LEN_SAMPLES);
        frame[..n].copy_from_slice(&self.pending[..n]);
        frame[n..].fill(0.0);
        self.pending.drain(..n);
        Ok(true)
    }
}

/// Output frames sent as [`Event::Audio`] on the session's event channel.
#[derive(Debug)]
pub struct EventSink {
    tx: Sender<Event>,
    frame: u64,
}

impl EventSink {
    pub fn new(tx: Sender<Event>) -> Self {
        Self { tx, frame: 0 }
    }
}

impl FrameSink for EventSink {
    fn write_frame(&mut self, frame: &[f32]) -> Result<()> {
        if frame.len() != FRAME_LEN_SAMPLES {
            return Err(Error::InvalidInput(format!(
                "an output frame of {} samples (80 ms is {FRAME_LEN_SAMPLES})",
                frame.len()
            )));
        }
        self.tx
            .send(Event::Audio {
                frame: self.frame,
                pcm: frame.to_vec(),
            })
            .map_err(|_| Error::InvalidInput("the event reader has gone away".into()))?;
        self.frame += 1;
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Output discarded (listen mode has none).
#[derive(Debug, Default)]
pub struct NullSink;

impl FrameSink for NullSink {
    fn write_frame(&mut self, _frame: &[f32]) -> Result<()> {
        Ok(())
    }
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
