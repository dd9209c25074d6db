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

impl PcmSource {
    /// Waits until `samples` are pending or the input has ended.
    fn fill_to(&mut self, samples: usize) {
        while self.pending.len() < samples && !self.ended {
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
    }
}

impl FrameSource for PcmSource {
    /// A client that streams its audio live gives each frame's first part before the rest.
    fn next_part(&mut self, part: &mut [f32]) -> Result<bool> {
        // What has arrived already: a frame that is whole needs no part.
        while self.pending.len() < FRAME_LEN_SAMPLES {
            match self.rx.try_recv() {
                Ok(chunk) => self.pending.extend_from_slice(&chunk),
                Err(_) => break,
            }
        }
        if part.is_empty()
            || part.len() >= FRAME_LEN_SAMPLES
            || self.pending.len() >= FRAME_LEN_SAMPLES
        {
            return Ok(false);
        }
        self.fill_to(part.len());
        if self.pending.len() < part.len() {
            // The input ended: its last frame comes whole from `next_frame`.
            return Ok(false);
        }
        part.copy_from_slice(&self.pending[..part.len()]);
        Ok(true)
    }

    fn next_frame(&mut self, frame: &mut [f32; FRAME_LEN_SAMPLES]) -> Result<bool> {
        self.fill_to(FRAME_LEN_SAMPLES);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Audio sent in 10 ms pieces: the first half of a frame is handed out once it is in,
    /// the frame (those samples first) once it is whole; a frame already whole, or a last
    /// one cut short by the input's end, comes whole.
    #[test]
    fn a_streamed_frame_is_handed_out_by_halves_then_whole() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut src = PcmSource::new(rx);
        let pcm: Vec<f32> = (0..3 * FRAME_LEN_SAMPLES + 500).map(|i| i as f32).collect();
        for piece in pcm[..FRAME_LEN_SAMPLES / 2].chunks(240) {
            tx.send(piece.to_vec()).expect("send");
        }
        let mut half = [0f32; FRAME_LEN_SAMPLES / 2];
        assert!(src.next_part(&mut half).expect("part"));
        assert_eq!(&half[..], &pcm[..FRAME_LEN_SAMPLES / 2]);
        for piece in pcm[FRAME_LEN_SAMPLES / 2..].chunks(240) {
            tx.send(piece.to_vec()).expect("send");
        }
        drop(tx);
        let mut frame = [0f32; FRAME_LEN_SAMPLES];
        assert!(src.next_frame(&mut frame).expect("frame"));
        assert_eq!(&frame[..], &pcm[..FRAME_LEN_SAMPLES]);
        // Everything has arrived: the next frame is whole already.
        assert!(!src.next_part(&mut half).expect("part"));
        assert!(src.next_frame(&mut frame).expect("frame"));
        assert!(src.next_frame(&mut frame).expect("frame"));
        // 500 samples left, fewer than a half: no part; the frame, padded.
        assert!(!src.next_part(&mut half).expect("part"));
        assert!(src.next_frame(&mut frame).expect("frame"));
        assert_eq!(&frame[..500], &pcm[3 * FRAME_LEN_SAMPLES..]);
        assert!(frame[500..].iter().all(|&v| v == 0.0));
        assert!(!src.next_part(&mut half).expect("part"));
        assert!(!src.next_frame(&mut frame).expect("end"));
    }
}
