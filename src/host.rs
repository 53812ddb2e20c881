//! Host-side tensors, seeded random data and error metrics: what tests, the
//! command-line checks and the benches use to feed kernels and judge them.

use crate::dtype::{DType, Element};
use half::{bf16, f16};

/// A flat host buffer of one of the storage element types.
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

/// Runs `$body` with `$v` bound to the typed `Vec` inside a [`HostData`] and the
/// type alias `$t` naming its element type.
#[macro_export]
macro_rules! with_host_data {
    ($data:expr, $v:ident, $t:ident => $body:expr) => {
        match $data {
            $crate::host::HostData::F32($v) => {
                #[allow(dead_code)]
                type $t = f32;
                $body
            }
            $crate::host::HostData::F16($v) => {
                #[allow(dead_code)]
                type $t = half::f16;
                $body
            }
            $crate::host::HostData::Bf16($v) => {
                #[allow(dead_code)]
                type $t = half::bf16;
                $body
            }
        }
    };
}

impl HostData {
    /// Rounds f32 values to `dtype`.
    pub fn from_f32(dtype: DType, values: &[f32]) -> Self {
        match dtype {
            DType::F32 => HostData::F32(values.to_vec()),
            DType::F16 => HostData::F16(values.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::Bf16 => HostData::Bf16(values.iter().map(|&x| bf16::from_f32(x)).collect()),
        }
    }

    /// `n` NaNs: a buffer an output must overwrite before it is compared.
    pub fn poisoned(dtype: DType, n: usize) -> Self {
        Self::from_f32(dtype, &vec![f32::NAN; n])
    }

    /// `n` values uniform in [-1, 1).
    pub fn random(dtype: DType, n: usize, rng: &mut Rng) -> Self {
        let v: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
        Self::from_f32(dtype, &v)
    }

    pub fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::F16(_) => DType::F16,
            HostData::Bf16(_) => DType::Bf16,
        }
    }

    pub fn len(&self) -> usize {
        with_host_data!(self, v, T => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_bytes(&self) -> &[u8] {
        with_host_data!(self, v, T => bytemuck::cast_slice(v))
    }

    pub fn to_f64(&self) -> Vec<f64> {
        with_host_data!(self, v, T => v.iter().map(|x| x.to_f64()).collect())
    }

    /// Reinterprets little-endian bytes read back from a device.
    pub fn from_bytes(dtype: DType, bytes: &[u8]) -> Self {
        fn cast<T: Element>(b: &[u8]) -> Vec<T> {
            bytes_to_vec(b)
        }
        match dtype {
            DType::F32 => HostData::F32(cast(bytes)),
            DType::F16 => HostData::F16(cast(bytes)),
            DType::Bf16 => HostData::Bf16(cast(bytes)),
        }
    }
}

/// Copies bytes into a freshly allocated, properly aligned `Vec<T>`.
pub fn bytes_to_vec<T: bytemuck::Pod + Default>(bytes: &[u8]) -> Vec<T> {
    let n = bytes.len() / std::mem::size_of::<T>();
    let mut out = vec![T::default(); n];
    bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(&bytes[..n * std::mem::size_of::<T>()]);
    out
}

/// SplitMix64: a small, seeded, reproducible generator for test data. Not for cryptography.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * unit
    }

    /// Uniform integer in [lo, hi] (inclusive).
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
}

/// Relative L2 error `||got - want|| / ||want||` (absolute when `want` is all zeros).
/// Any NaN in `got` that is not also in `want` makes the result NaN, which fails every
/// `err <= tol` check; NaN positions shared by both are compared as equal.
pub fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "rel_l2: length mismatch");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        if w.is_nan() && g.is_nan() {
            continue;
        }
        num += (g - w) * (g - w);
        den += w * w;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}
