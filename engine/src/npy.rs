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

#[cfg(test)]
mod tests {
    use super::*;

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
}
