//! Results on stdout. `println!` panics when stdout fails (a closed pipe: `parley models
//! list | head -1`; a full disk); these macros return the failure as an error instead,
//! which `main` reports once with a non-zero exit.

use std::io::Write;

/// Writes `args` to stdout; the error says it was stdout that failed.
pub fn write(args: std::fmt::Arguments<'_>, newline: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let r = if newline {
        writeln!(out, "{args}")
    } else {
        write!(out, "{args}")
    };
    r.and_then(|()| out.flush())
        .map_err(|e| anyhow::anyhow!("writing to stdout: {e}"))
}

/// `println!` that returns stdout's failure with `?`.
macro_rules! outln {
    () => {
        $crate::out::write(format_args!(""), true)?
    };
    ($($arg:tt)*) => {
        $crate::out::write(format_args!($($arg)*), true)?
    };
}

/// `print!` that returns stdout's failure with `?`.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::write(format_args!($($arg)*), false)?
    };
}

pub(crate) use {out, outln};
