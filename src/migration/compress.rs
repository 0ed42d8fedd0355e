//! Compression of page runs on the wire, and the zero-page test.
//!
//! The sender picks a [`Compression`] (`--compress`); each run of pages is
//! then sent with the [`Encoding`] that actually paid off for it, so pages
//! that do not compress (encrypted or already compressed data) cost no more
//! than raw ones. The receiver decodes into a buffer of exactly the run's
//! size and refuses anything else: corrupt input is an error, never a
//! panic, an overflow or a short page.

use std::cell::RefCell;
use std::fmt;

use crate::memory::PAGE_SIZE;

/// Bytes in one guest page.
const PAGE_LEN: usize = PAGE_SIZE as usize;

/// zstd level: 1 is the fastest; on guest memory higher levels gain a few
/// percent of ratio for a multiple of the CPU time, which a live migration
/// pays in link time it does not save.
const ZSTD_LEVEL: i32 = 1;

/// Compressed output is kept only if it is at most this fraction
/// (numerator / denominator) of the input: below that, the receiver's
/// decode time is not paid back by the bytes saved.
const WORTH_NUMERATOR: usize = 7;
/// See [`WORTH_NUMERATOR`].
const WORTH_DENOMINATOR: usize = 8;

/// What the sender tries on page data (`--compress none|lz4|zstd`).
pub use crate::api::migration::Compression;

/// How one run of pages is encoded on the wire (one byte in a `Pages`
/// frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// The pages' bytes as they are.
    Raw,
    /// One LZ4 block (no size prefix: the size is the page count).
    Lz4,
    /// One or more zstd frames.
    Zstd,
}

impl Encoding {
    /// The wire value.
    pub fn to_byte(self) -> u8 {
        match self {
            Encoding::Raw => 0,
            Encoding::Lz4 => 1,
            Encoding::Zstd => 2,
        }
    }

    /// The encoding of a wire value, `None` for an unknown one.
    pub fn from_byte(b: u8) -> Option<Encoding> {
        match b {
            0 => Some(Encoding::Raw),
            1 => Some(Encoding::Lz4),
            2 => Some(Encoding::Zstd),
            _ => None,
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encoding::Raw => "raw",
            Encoding::Lz4 => "lz4",
            Encoding::Zstd => "zstd",
        })
    }
}

/// Why a run of pages could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The output buffer is not a whole number of pages.
    #[error("the output buffer is {0} bytes, not a whole number of 4 KiB pages")]
    NotPages(usize),
    /// Raw data of the wrong size.
    #[error("raw page data is {got} bytes, expected {expected}")]
    RawLength {
        /// Bytes expected (pages × 4096).
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// The decompressor refused the input.
    #[error("corrupt {encoding} data: {reason}")]
    Corrupt {
        /// The encoding being decoded.
        encoding: Encoding,
        /// The decompressor's message.
        reason: String,
    },
    /// The input decompressed to the wrong size.
    #[error("{encoding} data decompressed to {got} bytes, expected {expected}")]
    Length {
        /// The encoding being decoded.
        encoding: Encoding,
        /// Bytes expected (pages × 4096).
        expected: usize,
        /// Bytes produced.
        got: usize,
    },
}

thread_local! {
    // Contexts are reused: creating one per run would allocate and zero
    // hundreds of KiB for every few MiB of pages.
    static ZSTD_COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { RefCell::new(None) };
    static ZSTD_DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Encodes `data` (whole pages) with `compression` into `out` (cleared
/// first) and says which encoding `out` holds: `Raw` (a copy of `data`)
/// when compression is off, fails, or does not shrink the data below 7/8
/// of its size.
///
/// With `Compression::None` a sender may skip the copy and send `data`
/// itself as `Encoding::Raw`.
pub fn encode_pages(data: &[u8], compression: Compression, out: &mut Vec<u8>) -> Encoding {
    out.clear();
    let limit = data.len() / WORTH_DENOMINATOR * WORTH_NUMERATOR;
    let encoded = match compression {
        Compression::None => None,
        Compression::Lz4 => {
            out.resize(lz4_flex::block::get_maximum_output_size(data.len()), 0);
            match lz4_flex::block::compress_into(data, out) {
                Ok(n) if n <= limit => {
                    out.truncate(n);
                    Some(Encoding::Lz4)
                }
                _ => None,
            }
        }
        Compression::Zstd => {
            out.resize(zstd::zstd_safe::compress_bound(data.len()), 0);
            let n = ZSTD_COMPRESSOR.with(|c| {
                let mut c = c.borrow_mut();
                if c.is_none() {
                    *c = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
                }
                c.as_mut()?
                    .compress_to_buffer(data, out.as_mut_slice())
                    .ok()
            });
            match n {
                Some(n) if n <= limit => {
                    out.truncate(n);
                    Some(Encoding::Zstd)
                }
                _ => None,
            }
        }
    };
    encoded.unwrap_or_else(|| {
        out.clear();
        out.extend_from_slice(data);
        Encoding::Raw
    })
}

/// Decodes `input` (encoded as `encoding`) into `out`, whose length is the
/// run's size (pages × 4096); anything that does not produce exactly that
/// many bytes is an error.
pub fn decode_pages(encoding: Encoding, input: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
    if !out.len().is_multiple_of(PAGE_LEN) {
        return Err(DecodeError::NotPages(out.len()));
    }
    let expected = out.len();
    let got = match encoding {
        Encoding::Raw => {
            if input.len() != expected {
                return Err(DecodeError::RawLength {
                    expected,
                    got: input.len(),
                });
            }
            out.copy_from_slice(input);
            expected
        }
        Encoding::Lz4 => {
            lz4_flex::block::decompress_into(input, out).map_err(|e| DecodeError::Corrupt {
                encoding,
                reason: e.to_string(),
            })?
        }
        Encoding::Zstd => ZSTD_DECOMPRESSOR.with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = Some(
                    zstd::bulk::Decompressor::new().map_err(|e| DecodeError::Corrupt {
                        encoding,
                        reason: format!("cannot create a zstd context: {e}"),
                    })?,
                );
            }
            let d = d.as_mut().expect("set just above");
            d.decompress_to_buffer(input, out)
                .map_err(|e| DecodeError::Corrupt {
                    encoding,
                    reason: e.to_string(),
                })
        })?,
    };
    if got != expected {
        return Err(DecodeError::Length {
            encoding,
            expected,
            got,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages that look like guest memory: some text-like, some zero, some
    /// pseudo-random (incompressible).
    fn sample_pages(pages: usize) -> Vec<u8> {
        let mut data = vec![0u8; pages * PAGE_LEN];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for (i, page) in data.chunks_mut(PAGE_LEN).enumerate() {
            match i % 3 {
                0 => page
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, b)| *b = b"vmhop moves memory "[j % 19]),
                1 => {}
                _ => page.iter_mut().for_each(|b| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }),
            }
        }
        data
    }

    #[test]
    fn compression_parses_and_displays() {
        for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
            assert_eq!(c.to_string().parse::<Compression>().unwrap(), c);
            assert_eq!(
                serde_json::to_string(&c).unwrap(),
                format!("\"{c}\""),
                "serde uses the CLI spelling"
            );
        }
        let err = "gzip".parse::<Compression>().unwrap_err().to_string();
        assert!(err.contains("'gzip'") && err.contains("lz4"), "{err}");
    }

    #[test]
    fn every_compression_round_trips() {
        let data = sample_pages(9);
        let mut wire = Vec::new();
        for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let encoding = encode_pages(&data, c, &mut wire);
            if c != Compression::None {
                assert_ne!(encoding, Encoding::Raw, "{c} should pay on these pages");
                assert!(wire.len() < data.len() * 7 / 8);
            }
            let mut out = vec![0xAAu8; data.len()];
            decode_pages(encoding, &wire, &mut out).unwrap();
            assert_eq!(out, data, "{c}");
        }
    }

    #[test]
    fn incompressible_pages_fall_back_to_raw() {
        let data = sample_pages(3)[2 * PAGE_LEN..].to_vec();
        let mut wire = Vec::new();
        for c in [Compression::Lz4, Compression::Zstd] {
            assert_eq!(encode_pages(&data, c, &mut wire), Encoding::Raw);
            assert_eq!(wire, data);
        }
    }

    #[test]
    fn corrupt_compressed_input_is_an_error_not_a_panic() {
        let data = sample_pages(6);
        let mut wire = Vec::new();
        let mut out = vec![0u8; data.len()];
        for c in [Compression::Lz4, Compression::Zstd] {
            let encoding = encode_pages(&data, c, &mut wire);
            // Every truncation.
            for len in 0..wire.len() {
                assert!(decode_pages(encoding, &wire[..len], &mut out).is_err());
            }
            // Flipped bytes: an error or, if the damage is in a literal,
            // the right size of wrong data; never a panic.
            for i in 0..wire.len() {
                let mut bad = wire.clone();
                bad[i] ^= 0x5A;
                let _ = decode_pages(encoding, &bad, &mut out);
            }
            // Valid data for a different size of run.
            let mut small = vec![0u8; data.len() - PAGE_LEN];
            assert!(decode_pages(encoding, &wire, &mut small).is_err());
            let mut big = vec![0u8; data.len() + PAGE_LEN];
            let err = decode_pages(encoding, &wire, &mut big).unwrap_err();
            assert!(err.to_string().contains("expected"), "{err}");
            // Garbage.
            let garbage: Vec<u8> = (0..1000u32).map(|i| (i * 7919) as u8).collect();
            assert!(decode_pages(encoding, &garbage, &mut out).is_err());
        }
        let err = decode_pages(Encoding::Raw, &data[1..], &mut out).unwrap_err();
        assert!(matches!(err, DecodeError::RawLength { .. }), "{err}");
        let mut odd = vec![0u8; 100];
        assert!(matches!(
            decode_pages(Encoding::Raw, &data[..100], &mut odd),
            Err(DecodeError::NotPages(100))
        ));
    }
}
