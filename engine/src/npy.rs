//! Integer token arrays as `.npy` files (through candle's reader and writer), checked on
//! the way in.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

fn npy_err(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Npy {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Writes `rows` (all the same length) as an int64 array of shape `[rows, cols]`.
pub fn write_i64_2d(path: &Path, rows: &[Vec<u32>]) -> Result<()> {
    let cols = rows.first().map_or(0, Vec::len);
    if rows.iter().any(|r| r.len() != cols) {
        return Err(npy_err(path, "rows of different lengths"));
    }
    let flat: Vec<i64> = rows.iter().flatten().map(|&v| v as i64).collect();
    let t = Tensor::from_vec(flat, (rows.len(), cols), &Device::Cpu)?;
    write_tensor(path, &t)
}

/// Writes `t` to `path` through a temporary file renamed into place.
fn write_tensor(path: &Path, t: &Tensor) -> Result<()> {
    crate::outfile::write_atomically(path, |tmp| t.write_npy(tmp).map_err(|e| npy_err(path, e)))
}

/// Writes a 2-D int64 array of signed values (rows of equal length).
pub fn write_i64_2d_signed(path: &Path, rows: &[Vec<i64>]) -> Result<()> {
    let cols = rows.first().map_or(0, Vec::len);
    if rows.iter().any(|r| r.len() != cols) {
        return Err(npy_err(path, "rows of different lengths"));
    }
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    let t = Tensor::from_vec(flat, (rows.len(), cols), &Device::Cpu)?;
    write_tensor(path, &t)
}

/// Writes a 1-D int64 array.
pub fn write_i64_1d(path: &Path, values: &[u32]) -> Result<()> {
    let flat: Vec<i64> = values.iter().map(|&v| v as i64).collect();
    let t = Tensor::from_vec(flat, values.len(), &Device::Cpu)?;
    write_tensor(path, &t)
}

/// Reads a 2-D array of non-negative integers (any integer dtype) below `max_exclusive`.
pub fn read_u32_2d(path: &Path, max_exclusive: u32) -> Result<Vec<Vec<u32>>> {
    if !path.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    check_header(path)?;
    let t = Tensor::read_npy(path)
        .map_err(|e| npy_err(path, format!("not a readable .npy file: {e}")))?;
    if t.rank() != 2 {
        return Err(npy_err(
            path,
            format!("expected a 2-D array, found shape {:?}", t.dims()),
        ));
    }
    let rows: Vec<Vec<i64>> = match t.dtype() {
        DType::I64 | DType::I32 | DType::U32 | DType::U8 | DType::I16 => {
            t.to_dtype(DType::I64)?.to_vec2()?
        }
        other => return Err(npy_err(path, format!("expected integers, found {other:?}"))),
    };
    let mut out = Vec::with_capacity(rows.len());
    for (k, row) in rows.into_iter().enumerate() {
        let mut r = Vec::with_capacity(row.len());
        for (t, v) in row.into_iter().enumerate() {
            if v < 0 || v >= max_exclusive as i64 {
                return Err(npy_err(
                    path,
                    format!("value {v} at [{k}, {t}] is outside 0..{max_exclusive}"),
                ));
            }
            r.push(v as u32);
        }
        out.push(r);
    }
    Ok(out)
}

/// The most values a `.npy` input may hold (16.8 million: codes of 4 hours at 64
/// codebooks fit), so a file, however large on disk (a sparse one costs nothing), never
/// sizes more than 128 MB of memory.
pub const MAX_VALUES: u64 = 1 << 24;

/// Checks that the header's shape and element size describe exactly the bytes the file
/// holds, before a reader sizes anything from them (a 1.4 KB file may claim 2^62 x 2^62).
fn check_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let bad = |reason: String| npy_err(path, reason);
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut head = vec![0u8; 12];
    f.read_exact(&mut head)
        .map_err(|_| bad("too short for a .npy header".into()))?;
    if &head[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file (no \\x93NUMPY magic)".into()));
    }
    let (prefix, header_len) = match head[6] {
        1 => (10u64, u64::from(u16::from_le_bytes([head[8], head[9]]))),
        2 | 3 => (
            12u64,
            u64::from(u32::from_le_bytes([head[8], head[9], head[10], head[11]])),
        ),
        v => return Err(bad(format!(".npy format version {v} (1 to 3 expected)"))),
    };
    if prefix + header_len > file_len || header_len > 1 << 16 {
        return Err(bad(format!(
            "a header of {header_len} bytes in a file of {file_len}"
        )));
    }
    // The header text: what of it the first 12 bytes hold (v1), then the rest.
    let mut all = head[prefix as usize..].to_vec();
    all.truncate(header_len as usize);
    let mut rest = vec![0u8; header_len as usize - all.len()];
    f.read_exact(&mut rest).map_err(|e| Error::io(path, e))?;
    all.extend(rest);
    let text = String::from_utf8_lossy(&all);
    // candle's reader takes the last of repeated keys (and trims their spaces): a header
    // naming one twice could pass this check with one shape and be read with another.
    for key in ["descr", "shape", "fortran_order"] {
        if text.matches(key).count() > 1 {
            return Err(bad(format!("the header names '{key}' more than once")));
        }
    }
    let field = |key: &str| text.find(key).map(|i| &text[i + key.len()..]);
    let descr = field("'descr':")
        .and_then(|r| r.trim_start().strip_prefix('\''))
        .and_then(|r| r.split('\'').next())
        .ok_or_else(|| bad("the header has no 'descr' string (such as '<i8')".into()))?;
    let itemsize: u64 = descr
        .trim_start_matches(['<', '>', '|', '='])
        .get(1..)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| bad(format!("element type '{descr}' is not a number type")))?;
    let dims = field("'shape':")
        .and_then(|r| Some(&r[r.find('(')? + 1..r.find(')')?]))
        .ok_or_else(|| bad("the header has no 'shape'".into()))?;
    let mut count = 1u64;
    for d in dims.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let n: u64 = d
            .parse()
            .map_err(|_| bad(format!("shape ({dims}) is not a list of sizes")))?;
        count = count.saturating_mul(n);
    }
    let need = count.saturating_mul(itemsize);
    let have = file_len - prefix - header_len;
    if need != have {
        return Err(bad(format!(
            "the header's shape ({dims}) of '{descr}' needs {need} bytes of data; the file holds {have}"
        )));
    }
    if count > MAX_VALUES {
        return Err(bad(format!(
            "the header's shape ({dims}) holds {count} values; at most {MAX_VALUES} are read (4 hours of 64 codebooks at 12.5 Hz is 11.5 million)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header whose shape claims more (or less) than the file holds is an error naming
    /// both, before any reader sizes a buffer from it.
    #[test]
    fn a_header_claiming_more_than_the_file_holds_is_refused() {
        let dir = std::env::temp_dir().join(format!("parley-npy-hdr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("codes.npy");
        write_i64_2d(&path, &[vec![1, 2, 3], vec![4, 5, 6]]).expect("write");
        check_header(&path).expect("a true header");
        let bytes = std::fs::read(&path).expect("read");
        // The shape's numbers, however the writer spelt them ("(2,3,)").
        let key = &b"'shape': ("[..];
        let from = bytes
            .windows(key.len())
            .position(|w| w == key)
            .expect("the shape is in the header")
            + key.len();
        let to = from + bytes[from..].iter().position(|&b| b == b')').expect(")");
        let mut forged = bytes[..from].to_vec();
        forged.extend_from_slice(b"4611686018427387904, 4611686018427387904");
        forged.extend_from_slice(&bytes[to..]);
        // Keep the header's declared (v1) length true to the longer text.
        let extra = forged.len() - bytes.len();
        let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize + extra;
        forged[8..10].copy_from_slice(&(len as u16).to_le_bytes());
        std::fs::write(&path, &forged).expect("write");
        let err = read_u32_2d(&path, 2048).expect_err("forged").to_string();
        assert!(
            err.contains("needs") && err.contains("the file holds 48"),
            "{err}"
        );
        // A true header over a (sparse) file too large to read: refused before reading.
        let big = dir.join("big.npy");
        write_i64_2d(&big, &vec![vec![0; 3]; 8]).expect("write");
        let bytes = std::fs::read(&big).expect("read");
        let from = bytes
            .windows(key.len())
            .position(|w| w == key)
            .expect("shape")
            + key.len();
        let to = from + bytes[from..].iter().position(|&b| b == b')').expect(")");
        let header_end = bytes.len() - 8 * 3 * 8;
        let mut forged = bytes[..from].to_vec();
        forged.extend_from_slice(b"8, 4194304");
        forged.extend_from_slice(&bytes[to..header_end]);
        let extra = forged.len() - header_end;
        let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize + extra;
        forged[8..10].copy_from_slice(&(len as u16).to_le_bytes());
        std::fs::write(&big, &forged).expect("write");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&big)
            .expect("open");
        f.set_len((forged.len() + 8 * 4194304 * 8) as u64)
            .expect("sparse");
        let err = read_u32_2d(&big, 2048).expect_err("too big").to_string();
        assert!(err.contains("at most 16777216"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn round_trip_and_range_check() {
        let dir = std::env::temp_dir().join(format!("parley-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("codes.npy");
        let rows = vec![vec![1, 2, 3], vec![4, 5, 2047]];
        write_i64_2d(&path, &rows).expect("write");
        assert_eq!(read_u32_2d(&path, 2048).expect("read"), rows);
        let err = read_u32_2d(&path, 2000).expect_err("range").to_string();
        assert!(err.contains("2047") && err.contains("codes.npy"), "{err}");
        std::fs::write(&path, b"\x93NUMPY garbage").expect("write");
        assert!(read_u32_2d(&path, 2048).is_err());
    }

    /// A header naming a key twice (the reader takes the last) is refused.
    #[test]
    fn a_header_naming_a_key_twice_is_refused() {
        let dir = std::env::temp_dir().join(format!("parley-npy-dup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("dup.npy");
        for dict in [
            "{'descr': '<i8', 'fortran_order': False, 'shape': (1, 1), 'shape': (1099511627776, 1), }",
            "{'descr': '<i8', 'fortran_order': False, 'shape': (1, 1), ' shape': (1099511627776, 1), }",
        ] {
            let mut h = dict.to_string();
            while (10 + h.len() + 1) % 64 != 0 {
                h.push(' ');
            }
            h.push('\n');
            let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
            bytes.extend((h.len() as u16).to_le_bytes());
            bytes.extend(h.as_bytes());
            bytes.extend(7i64.to_le_bytes());
            std::fs::write(&path, &bytes).expect("write");
            let err = read_u32_2d(&path, 2048).expect_err("twice").to_string();
            assert!(err.contains("'shape' more than once"), "{err}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
