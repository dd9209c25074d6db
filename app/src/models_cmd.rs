//! `parley models list | pull PRESET | path PRESET`: the presets registry and downloads
//! from the Hugging Face Hub into its usual cache (`HF_HOME`, `HF_HUB_CACHE`,
//! `HF_ENDPOINT` and `HF_TOKEN` are honoured).

use crate::out::outln;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use parley_engine::hub::{
    format_bytes, preset, presets, CancelToken, FileState, Hub, PullOptions, PullPhase,
    PullProgress,
};

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// List the presets: mode, size, whether Parley runs them, whether they are downloaded.
    List,
    /// Download a preset into the Hugging Face cache; an interrupted download resumes.
    /// Prints the model directory.
    Pull(PullArgs),
    /// Print a downloaded preset's model directory (for --model-dir); fails with what to
    /// pull otherwise.
    Path {
        /// A preset name from `parley models list`.
        preset: String,
    },
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// A preset name from `parley models list`.
    preset: String,
    /// How many times a broken transfer is resumed before giving up.
    #[arg(long, default_value_t = 3)]
    retries: u32,
}

pub fn run(cmd: ModelsCommand) -> Result<()> {
    match cmd {
        ModelsCommand::List => list(),
        ModelsCommand::Pull(args) => pull(args),
        ModelsCommand::Path { preset: name } => {
            let p = preset(&name)?;
            let dir = Hub::from_env()?.local_dir(p)?;
            outln!("{}", dir.display());
            Ok(())
        }
    }
}

fn list() -> Result<()> {
    let hub = Hub::from_env()?;
    outln!("cache: {}", hub.config().cache_dir.display());
    // The name column as wide as the longest preset name.
    let w = presets().iter().map(|p| p.name.len()).max().unwrap_or(6);
    outln!(
        "{:<w$} {:<7} {:>9}  {:<9}  LOCAL",
        "PRESET",
        "MODE",
        "SIZE",
        "SUPPORTED"
    );
    let mut estimated = false;
    for p in presets() {
        let status = hub.status(p);
        let size = format!(
            "{}{}",
            if p.size_is_estimate() { "~" } else { "" },
            format_bytes(p.total_bytes())
        );
        estimated |= p.size_is_estimate();
        let local = if let Some(dir) = &status.local_dir {
            format!("downloaded: {}", dir.display())
        } else if status
            .files
            .iter()
            .any(|f| !matches!(f.state, FileState::Missing))
        {
            format!(
                "partial: {} left to fetch",
                format_bytes(status.bytes_to_fetch)
            )
        } else {
            "not downloaded".to_string()
        };
        outln!(
            "{:<w$} {:<7} {:>9}  {:<9}  {}",
            p.name,
            p.mode.as_str(),
            size,
            if p.supported { "yes" } else { "no" },
            local
        );
    }
    if estimated {
        outln!(
            "~ size estimated (computed from the architecture, or taken from a sibling repository)"
        );
    }
    for p in presets().iter().filter(|p| !p.supported) {
        if let Some(reason) = &p.unsupported_reason {
            outln!("{} is not supported: {reason}", p.name);
        }
    }
    Ok(())
}

fn pull(args: PullArgs) -> Result<()> {
    let p = preset(&args.preset)?;
    if !p.supported {
        bail!(
            "preset `{}` is not supported: {}",
            p.name,
            p.unsupported_reason.as_deref().unwrap_or("no reason given")
        );
    }
    let hub = Hub::from_env()?;
    let cancel = CancelToken::new();
    {
        let cancel = cancel.clone();
        // Ctrl-C stops at the next chunk and keeps the partial file for the next pull.
        ctrlc::set_handler(move || cancel.cancel()).context("installing the Ctrl-C handler")?;
    }
    let options = PullOptions {
        cancel,
        retries: args.retries,
        ..PullOptions::default()
    };
    let status = hub.status(p);
    if !status.is_complete() {
        eprintln!(
            "pulling {} ({}) from {} into {}: {} to fetch",
            p.name,
            p.repo,
            hub.config().endpoint,
            hub.config().cache_dir.display(),
            format_bytes(status.bytes_to_fetch)
        );
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
        )
        .context("progress bar template")?
        .progress_chars("=> "),
    );
    let mut show = |pr: &PullProgress| match &pr.phase {
        PullPhase::Resolving => bar.set_message(format!("resolving {}", pr.file)),
        PullPhase::Checking => bar.set_message(format!("checking {}", pr.file)),
        PullPhase::Downloading | PullPhase::FileDone => {
            bar.set_length(pr.bytes_total);
            bar.set_position(pr.bytes_done);
            bar.set_message(pr.file.clone());
        }
        PullPhase::Retrying { attempt, reason } => {
            bar.println(format!("retry {attempt}: {reason}"));
        }
        PullPhase::Done => {
            bar.set_length(pr.bytes_total);
            bar.set_position(pr.bytes_done);
        }
    };
    let result = hub.pull(p, &options, &mut show);
    bar.finish_and_clear();
    match result {
        Ok(dir) => {
            eprintln!("{} is ready", p.name);
            outln!("{}", dir.display());
            Ok(())
        }
        Err(e @ parley_engine::Error::Cancelled { .. }) => Err(e).context(format!(
            "interrupted; run `parley models pull {}` again to resume",
            p.name
        )),
        Err(e) => Err(e).context(format!("pulling {}", p.name)),
    }
}
