//! Matrix products on the CPU through `matrixmultiply` (ndarray's GEMM): strided views, checked
//! extents, `C ← α·A·B + β·C`. The fused linear cross-entropy's emulated backend runs its GEMMs here
//! (f32, as a GPU GEMM accumulates), the oracle its f64 ones.

/// A strided matrix: element `(i, j)` at `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a, F> {
    pub data: &'a [F],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, F> Mat<'a, F> {
    /// Row-major `[rows, cols]`.
    pub fn rows(data: &'a [F], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose (a view: strides swapped).
    pub fn t(self) -> Self {
        Mat {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Whether every element lies inside `data` (an empty matrix always does).
    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1)
                .checked_mul(self.rs)
                .zip((self.cols - 1).checked_mul(self.cs))
                .and_then(|(a, b)| a.checked_add(b))
                .is_some_and(|last| last < self.data.len())
    }
}

/// A row-major `[rows, cols]` output matrix (rows `cols` apart, so no two elements alias).
#[derive(Debug)]
pub struct MatMut<'a, F> {
    pub data: &'a mut [F],
    pub rows: usize,
    pub cols: usize,
}

/// The element types with a GEMM: f32 and f64.
pub trait GemmElem: Copy + PartialEq + std::ops::Mul<Output = Self> {
    const ZERO: Self;

    /// `matrixmultiply`'s `sgemm` / `dgemm`.
    ///
    /// # Safety
    /// As `matrixmultiply::sgemm`: every element addressed through the dimensions and strides lies
    /// inside its buffer, and `c`'s elements are distinct.
    #[allow(clippy::too_many_arguments)]
    unsafe fn raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: (*const Self, isize, isize),
        b: (*const Self, isize, isize),
        beta: Self,
        c: (*mut Self, isize, isize),
    );
}

macro_rules! gemm_elem {
    ($t:ty, $f:path) => {
        impl GemmElem for $t {
            const ZERO: Self = 0.0;
            unsafe fn raw(
                m: usize,
                k: usize,
                n: usize,
                alpha: Self,
                a: (*const Self, isize, isize),
                b: (*const Self, isize, isize),
                beta: Self,
                c: (*mut Self, isize, isize),
            ) {
                // SAFETY: the caller's contract is the callee's.
                unsafe {
                    $f(
                        m, k, n, alpha, a.0, a.1, a.2, b.0, b.1, b.2, beta, c.0, c.1, c.2,
                    )
                }
            }
        }
    };
}
gemm_elem!(f32, matrixmultiply::sgemm);
gemm_elem!(f64, matrixmultiply::dgemm);

/// `c ← alpha · a · b + beta · c` (with `beta` 0, `c` is not read: it may hold anything). Panics when
/// the shapes disagree or a view reaches past its buffer (the callers check user input before).
pub fn gemm<F: GemmElem>(alpha: F, a: Mat<'_, F>, b: Mat<'_, F>, beta: F, c: MatMut<'_, F>) {
    assert!(
        a.cols == b.rows && c.rows == a.rows && c.cols == b.cols,
        "gemm shapes: [{}, {}] · [{}, {}] into [{}, {}]",
        a.rows,
        a.cols,
        b.rows,
        b.cols,
        c.rows,
        c.cols
    );
    assert!(a.fits() && b.fits(), "a gemm view reaches past its buffer");
    assert!(c
        .rows
        .checked_mul(c.cols)
        .is_some_and(|len| len <= c.data.len()));
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return;
    }
    let c_len = m * n;
    if k == 0 {
        // An empty sum: C ← β·C (0 when β is 0, whatever C held).
        for x in &mut c.data[..c_len] {
            *x = if beta == F::ZERO { F::ZERO } else { beta * *x };
        }
        return;
    }
    let stride = |s: usize| isize::try_from(s).expect("a stride of an allocated buffer fits isize");
    // SAFETY: the asserts above keep every element of `a` and `b` inside their slices, and `c` is a
    // row-major m × n block of its slice (distinct elements); the borrows outlive the call.
    unsafe {
        F::raw(
            m,
            k,
            n,
            alpha,
            (a.data.as_ptr(), stride(a.rs), stride(a.cs)),
            (b.data.as_ptr(), stride(b.rs), stride(b.cs)),
            beta,
            (c.data.as_mut_ptr(), stride(n), 1),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product by its definition, in f64.
    fn naive(a: Mat<'_, f64>, b: Mat<'_, f64>) -> Vec<f64> {
        let mut c = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                c[i * b.cols + j] = (0..a.cols)
                    .map(|l| a.data[i * a.rs + l * a.cs] * b.data[l * b.rs + j * b.cs])
                    .sum();
            }
        }
        c
    }

    #[test]
    fn strided_and_transposed_products_equal_the_definition() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f64 / (1u64 << 31) as f64) - 0.5
        };
        for (m, k, n) in [
            (1, 1, 1),
            (3, 5, 2),
            (17, 9, 33),
            (2, 0, 3),
            (0, 4, 4),
            (64, 70, 5),
        ] {
            let a: Vec<f64> = (0..m * k).map(|_| next()).collect();
            let bt: Vec<f64> = (0..n * k).map(|_| next()).collect(); // b stored transposed [n, k]
            let b = Mat::rows(&bt, n, k).t();
            let a = Mat::rows(&a, m, k);
            let want = naive(a, b);
            let mut got = vec![f64::NAN; m * n];
            gemm(
                1.0,
                a,
                b,
                0.0,
                MatMut {
                    data: &mut got,
                    rows: m,
                    cols: n,
                },
            );
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-12, "{m}×{k}×{n}: {g} vs {w}");
            }
            // Accumulate: c ← 2·a·b + 1·c.
            let mut acc = got.clone();
            gemm(
                2.0,
                a,
                b,
                1.0,
                MatMut {
                    data: &mut acc,
                    rows: m,
                    cols: n,
                },
            );
            for (g, w) in acc.iter().zip(&want) {
                assert!((g - 3.0 * w).abs() < 1e-12);
            }
            // f32 agrees to f32 precision.
            let (a32, b32): (Vec<f32>, Vec<f32>) = (
                a.data.iter().map(|&x| x as f32).collect(),
                bt.iter().map(|&x| x as f32).collect(),
            );
            let mut c32 = vec![f32::NAN; m * n];
            gemm(
                1.0f32,
                Mat::rows(&a32, m, k),
                Mat::rows(&b32, n, k).t(),
                0.0,
                MatMut {
                    data: &mut c32,
                    rows: m,
                    cols: n,
                },
            );
            for (g, w) in c32.iter().zip(&want) {
                assert!((f64::from(*g) - w).abs() < 1e-5);
            }
        }
    }

    #[test]
    #[should_panic(expected = "past its buffer")]
    fn a_view_past_its_buffer_is_refused() {
        let a = [1.0f32; 5];
        let mut c = [0.0f32; 4];
        gemm(
            1.0,
            Mat::rows(&a, 2, 3),
            Mat::rows(&a, 3, 2),
            0.0,
            MatMut {
                data: &mut c,
                rows: 2,
                cols: 2,
            },
        );
    }
}
