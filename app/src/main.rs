//! `parley`: the command line (and, later, the desktop app).

/// `eprintln!` that never panics: std's panics when stderr cannot be written (`2>/dev/full`,
/// a closed pipe), and the panic's own message then fails too. A log line that cannot be
/// written is dropped; a failing command still exits non-zero. Defined before the modules,
/// so it is the `eprintln!` of every one of them.
macro_rules! eprintln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod bench;
mod cascade_args;
mod headless;
mod latency;
mod lm_cmd;
mod mimi_cmd;
mod models_cmd;
mod out;
mod speak;
mod tts_cmd;
mod ui;
mod vad_cmd;

use std::process::ExitCode;

use out::outln;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

// Debug builds check that the real-time audio callbacks never allocate: an allocation
// inside `assert_no_alloc` aborts (AllocDisabler wraps the system allocator).
#[cfg(debug_assertions)]
#[global_allocator]
static ALLOC: assert_no_alloc::AllocDisabler = assert_no_alloc::AllocDisabler;

// Release builds: mimalloc keeps freed pages for reuse: a streaming step allocates the same
// large buffers every 80 ms, and the system allocator hands them back to the kernel and
// faults them in again (about 4% of a Mimi frame in profiles).
#[cfg(not(debug_assertions))]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "parley",
    version,
    about = "On-device spoken dialogue with Kyutai's models"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mimi, the audio codec: audio to codes and back.
    #[command(subcommand)]
    Mimi(mimi_cmd::MimiCommand),
    /// Transcribe a recording with a delayed-streams speech-to-text model.
    Stt(lm_cmd::SttArgs),
    /// Run a full-duplex Moshi-style model over a recording of the user.
    Moshi(lm_cmd::MoshiArgs),
    /// Say a text in a voice with a delayed-streams text-to-speech model.
    Tts(tts_cmd::TtsArgs),
    /// A live session without a window: JSON Lines (or raw PCM) on stdin and stdout, or
    /// the microphone and speakers.
    Headless(headless::HeadlessArgs),
    /// When speech starts and stops in a recording (Silero VAD through ONNX Runtime).
    Vad(vad_cmd::VadArgs),
    /// List the audio input and output devices (names for --input-device/--output-device)
    /// and the GPU adapters.
    Devices,
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Model presets: list them, download one from the Hugging Face Hub, print its directory.
    #[command(subcommand)]
    Models(models_cmd::ModelsCommand),
}

fn devices() -> anyhow::Result<()> {
    let list = parley_engine::audio::device::list_devices()?;
    outln!("audio ({}):", list.host);
    for (what, devs) in [("input", &list.inputs), ("output", &list.outputs)] {
        if devs.is_empty() {
            outln!("  no {what} devices");
        }
        for d in devs {
            outln!(
                "  {what:<6} {}{}",
                d.name,
                if d.is_default { "  (default)" } else { "" }
            );
        }
    }
    for line in parley_engine::compute::gpu::describe_choices() {
        outln!("--device {line}");
    }
    Ok(())
}

/// The command line, where every option that takes a value takes a negative number too
/// (`--temp -1` reaches the option's own range check, which names it, instead of clap's
/// "unexpected argument '-1'").
fn parse_cli() -> Cli {
    fn negatives(cmd: clap::Command) -> clap::Command {
        cmd.mut_args(|a| {
            if a.get_action().takes_values() && !a.is_positional() {
                a.allow_negative_numbers(true)
            } else {
                a
            }
        })
        .mut_subcommands(negatives)
    }
    let matches = negatives(Cli::command()).get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn main() -> ExitCode {
    ui::mark_process_start();
    let cli = parse_cli();
    let result = match cli.command {
        Some(Command::Mimi(cmd)) => mimi_cmd::run(cmd),
        Some(Command::Bench(cmd)) => bench::run(cmd),
        Some(Command::Stt(args)) => lm_cmd::stt(args),
        Some(Command::Moshi(args)) => lm_cmd::moshi(args),
        Some(Command::Tts(args)) => tts_cmd::run(args),
        Some(Command::Headless(args)) => headless::run(args),
        Some(Command::Vad(args)) => vad_cmd::run(args),
        Some(Command::Devices) => devices(),
        Some(Command::Models(cmd)) => models_cmd::run(cmd),
        None => ui::run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: a cause whose text an outer message already
/// holds (the engine's `path: <OS message>` over that OS error, a decoder's message over
/// its own I/O error) is not repeated.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !cause.is_empty() && !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}
