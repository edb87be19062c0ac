//! A bounds check of a GGUF file's header before candle reads it: every string, array and tensor
//! it declares must fit in the file. candle's reader allocates whatever lengths the file states,
//! so a corrupt or hostile model file could otherwise ask for terabytes and abort the node.

use std::io::Read;

use crate::error::{InferError, Result};

const MAGIC: u32 = 0x4655_4747; // "GGUF", little endian
const MAX_DIMS: u32 = 4;

struct Reader<R> {
    inner: R,
    left: u64,
    wide: bool,
}

fn bad(what: impl Into<String>) -> InferError {
    InferError::ModelUnavailable(format!("corrupt GGUF: {}", what.into()))
}

impl<R: Read> Reader<R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        if self.left < N as u64 {
            return Err(bad("truncated header"));
        }
        let mut b = [0u8; N];
        self.inner
            .read_exact(&mut b)
            .map_err(|e| bad(format!("reading the header: {e}")))?;
        self.left -= N as u64;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes::<4>()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes::<8>()?))
    }

    /// A length or count: 32 bits in version 1, 64 after.
    fn len(&mut self) -> Result<u64> {
        if self.wide {
            self.u64()
        } else {
            Ok(u64::from(self.u32()?))
        }
    }

    /// Skips `n` bytes that must be in the file.
    fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        if n > self.left {
            return Err(bad(format!(
                "{what} of {n} bytes runs past the end of the file"
            )));
        }
        let copied = std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink())
            .map_err(|e| bad(format!("reading the header: {e}")))?;
        if copied != n {
            return Err(bad("truncated header"));
        }
        self.left -= n;
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<()> {
        let n = self.len()?;
        self.skip(n, what)
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<()> {
        let fixed = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => return self.string("a string value"),
            9 => {
                if depth > 2 {
                    return Err(bad("arrays nested too deep"));
                }
                let elem = self.u32()?;
                let count = self.len()?;
                // Every element takes at least one byte: a count past the file is a lie.
                if count > self.left {
                    return Err(bad(format!(
                        "an array of {count} elements is larger than the file"
                    )));
                }
                for _ in 0..count {
                    self.value(elem, depth + 1)?;
                }
                return Ok(());
            }
            other => return Err(bad(format!("unknown value type {other}"))),
        };
        self.skip(fixed, "a value")
    }
}

/// The tensor types candle reads, by their GGUF id.
fn ggml_type(id: u32) -> Option<candle_core::quantized::GgmlDType> {
    use candle_core::quantized::GgmlDType as T;
    Some(match id {
        0 => T::F32,
        1 => T::F16,
        2 => T::Q4_0,
        3 => T::Q4_1,
        6 => T::Q5_0,
        7 => T::Q5_1,
        8 => T::Q8_0,
        9 => T::Q8_1,
        10 => T::Q2K,
        11 => T::Q3K,
        12 => T::Q4K,
        13 => T::Q5K,
        14 => T::Q6K,
        15 => T::Q8K,
        30 => T::BF16,
        _ => return None,
    })
}

/// Checks the header of the GGUF in `reader` (`file_len` bytes long).
pub(crate) fn check<R: Read>(reader: R, file_len: u64) -> Result<()> {
    let mut r = Reader {
        inner: reader,
        left: file_len,
        wide: true,
    };
    if r.u32()? != MAGIC {
        return Err(bad("not a GGUF file (bad magic)"));
    }
    let version = r.u32()?;
    if !(1..=3).contains(&version) {
        return Err(bad(format!("unsupported version {version}")));
    }
    r.wide = version > 1;
    let tensors = r.len()?;
    let kvs = r.len()?;
    if tensors > file_len || kvs > file_len {
        return Err(bad("more entries than bytes"));
    }
    for _ in 0..kvs {
        r.string("a metadata key")?;
        let ty = r.u32()?;
        r.value(ty, 0)?;
    }
    for _ in 0..tensors {
        r.string("a tensor name")?;
        let dims = r.u32()?;
        if dims == 0 || dims > MAX_DIMS {
            return Err(bad(format!("a tensor with {dims} dimensions")));
        }
        let mut elems: u64 = 1;
        for _ in 0..dims {
            let d = r.len()?;
            elems = elems
                .checked_mul(d)
                .ok_or_else(|| bad("tensor dimensions overflow"))?;
        }
        let ty = r.u32()?;
        let offset = r.u64()?;
        let dtype = ggml_type(ty).ok_or_else(|| bad(format!("unknown tensor type {ty}")))?;
        let bytes = (elems / dtype.block_size() as u64)
            .checked_mul(dtype.type_size() as u64)
            .ok_or_else(|| bad("tensor size overflows"))?;
        if offset.checked_add(bytes).is_none_or(|end| end > file_len) {
            return Err(bad(format!(
                "a tensor of {bytes} bytes does not fit in the file"
            )));
        }
    }
    Ok(())
}

/// Checks the GGUF file at `path`.
fn check_file(path: &std::path::Path) -> Result<()> {
    let file = std::fs::File::open(path)
        .map_err(|e| InferError::ModelUnavailable(format!("{}: {e}", path.display())))?;
    let len = file
        .metadata()
        .map_err(|e| InferError::ModelUnavailable(format!("{}: {e}", path.display())))?
        .len();
    check(std::io::BufReader::new(file), len)
}

/// Checks the GGUF file at `path`, then opens it and reads its metadata and tensor index (once,
/// for both the weights and the tokenizer).
pub(crate) fn open(
    path: &std::path::Path,
) -> Result<(std::fs::File, candle_core::quantized::gguf_file::Content)> {
    check_file(path)?;
    let mut file = std::fs::File::open(path)
        .map_err(|e| InferError::ModelUnavailable(format!("{}: {e}", path.display())))?;
    let ct = candle_core::quantized::gguf_file::Content::read(&mut file)
        .map_err(|e| InferError::ModelUnavailable(format!("reading the GGUF: {e}")))?;
    Ok((file, ct))
}

/// Checks GGUF bytes (fuzzing).
pub fn check_bytes(data: &[u8]) -> Result<()> {
    check(data, data.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u32, tensors: u64, kvs: u64) -> Vec<u8> {
        let mut b = MAGIC.to_le_bytes().to_vec();
        b.extend(version.to_le_bytes());
        b.extend(tensors.to_le_bytes());
        b.extend(kvs.to_le_bytes());
        b
    }

    #[test]
    fn lies_about_sizes_are_refused_before_any_allocation() {
        assert!(check_bytes(b"GGUF").is_err());
        assert!(check_bytes(b"NOPE\x03\x00\x00\x00").is_err());
        // A key claiming an exabyte.
        let mut b = header(3, 0, 1);
        b.extend(u64::MAX.to_le_bytes());
        assert!(check_bytes(&b).is_err());
        // An array claiming more elements than the file has bytes.
        let mut b = header(3, 0, 1);
        b.extend(1u64.to_le_bytes());
        b.push(b'k');
        b.extend(9u32.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        b.extend((1u64 << 40).to_le_bytes());
        assert!(check_bytes(&b).is_err());
        // A tensor far larger than the file.
        let mut b = header(3, 1, 0);
        b.extend(1u64.to_le_bytes());
        b.push(b't');
        b.extend(2u32.to_le_bytes());
        b.extend((1u64 << 20).to_le_bytes());
        b.extend((1u64 << 20).to_le_bytes());
        b.extend(0u32.to_le_bytes()); // f32
        b.extend(0u64.to_le_bytes());
        let Err(e) = check_bytes(&b) else {
            panic!("accepted a tensor larger than the file")
        };
        assert_eq!(e.kind(), "model_unavailable");
        assert!(e.to_string().contains("does not fit"), "{e}");
        assert!(check_bytes(&header(3, 0, 0)).is_ok());
    }
}
