//! Small dense linear algebra on top of faer, with the parallelism chosen by the caller (the merge
//! engine parallelises over targets with rayon and runs each target's algebra sequentially).
//!
//! faer matrices are column-major; our adapters are row-major. A row-major `rows x cols` slice is
//! the column-major `cols x rows` transpose, so views onto factors need no copy: [`view_t`].

use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor as llt;
use faer::linalg::evd::{self, ComputeEigenvectors};
use faer::linalg::householder;
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self as tri, BlockStructure};
use faer::linalg::qr::no_pivoting::factor as qr;
use faer::linalg::svd::{self, ComputeSvdVectors};
use faer::linalg::triangular_solve;
use faer::traits::RealField;
use faer::{Accum, Conj, Mat, MatMut, MatRef, Par};

use d2c_format::error::{Error, Result};

/// The column-major view of a row-major `rows x cols` slice: its transpose, `cols x rows`.
pub fn view_t<T: RealField>(data: &[T], rows: usize, cols: usize) -> MatRef<'_, T> {
    MatRef::from_column_major_slice(data, cols, rows)
}

/// `dst = lhs * rhs` (overwritten).
pub fn mul_into<T: RealField>(dst: MatMut<'_, T>, lhs: MatRef<'_, T>, rhs: MatRef<'_, T>, par: Par) {
    matmul(dst, Accum::Replace, lhs, rhs, T::one_impl(), par);
}

/// `lhs * rhs` as a new matrix.
pub fn mul<T: RealField>(lhs: MatRef<'_, T>, rhs: MatRef<'_, T>, par: Par) -> Mat<T> {
    let mut out = Mat::zeros(lhs.nrows(), rhs.ncols());
    mul_into(out.as_mut(), lhs, rhs, par);
    out
}

/// Thin QR of an `m x n` matrix kept in factored form: `M = Q R` with `Q` (m x k) orthonormal,
/// `R` (k x n), `k = min(m, n)`. `Q` is never formed; [`ThinQr::apply_q`] multiplies by it.
/// When `m <= n` nothing is gained by factoring, so `Q = I` and `R = M`.
pub struct ThinQr<T: RealField> {
    m: usize,
    /// Householder basis (unit lower trapezoidal, m x k) and block coefficients, or None for Q = I.
    householder: Option<(Mat<T>, Mat<T>)>,
    r: Mat<T>,
}

impl<T: RealField> ThinQr<T> {
    pub fn new(mut a: Mat<T>, par: Par) -> Self {
        let (m, n) = a.shape();
        if m <= n {
            return ThinQr { m, householder: None, r: a };
        }
        let blocksize = qr::recommended_blocksize::<T>(m, n);
        let mut coeff = Mat::zeros(blocksize, n);
        let req = qr::qr_in_place_scratch::<T>(m, n, blocksize, par, Default::default());
        qr::qr_in_place(a.as_mut(), coeff.as_mut(), par, MemStack::new(&mut MemBuffer::new(req)), Default::default());
        let mut r = Mat::zeros(n, n);
        for j in 0..n {
            for i in 0..=j {
                r[(i, j)] = a[(i, j)].clone();
                a[(i, j)] = if i == j { T::one_impl() } else { T::zero_impl() };
            }
        }
        ThinQr { m, householder: Some((a, coeff)), r }
    }

    /// `k`, the number of rows of `R` (columns of `Q`).
    pub fn k(&self) -> usize {
        self.r.nrows()
    }

    pub fn r(&self) -> MatRef<'_, T> {
        self.r.as_ref()
    }

    /// `Q X` for a `k x c` matrix `X`: an `m x c` matrix.
    pub fn apply_q(&self, x: MatRef<'_, T>, par: Par) -> Mat<T> {
        assert_eq!(x.nrows(), self.k());
        let mut out = Mat::zeros(self.m, x.ncols());
        out.as_mut().get_mut(..x.nrows(), ..).copy_from(x);
        if let Some((basis, coeff)) = &self.householder {
            let req = householder::apply_block_householder_sequence_on_the_left_in_place_scratch::<T>(self.m, coeff.nrows(), x.ncols());
            householder::apply_block_householder_sequence_on_the_left_in_place_with_conj(
                basis.as_ref(),
                coeff.as_ref(),
                Conj::No,
                out.as_mut(),
                par,
                MemStack::new(&mut MemBuffer::new(req)),
            );
        }
        out
    }
}

/// An orthonormal basis of the column space of `a` (m x n, m > n assumed useful): thin `Q`.
pub fn orthonormal_basis<T: RealField>(a: Mat<T>, par: Par) -> Mat<T> {
    let k = a.nrows().min(a.ncols());
    let f = ThinQr::new(a, par);
    if f.householder.is_none() {
        // m <= n: the identity's first k columns span everything.
        let mut q = Mat::zeros(f.m, k);
        for i in 0..k {
            q[(i, i)] = T::one_impl();
        }
        return q;
    }
    let mut eye = Mat::zeros(k, k);
    for i in 0..k {
        eye[(i, i)] = T::one_impl();
    }
    f.apply_q(eye.as_ref(), par)
}

/// Thin SVD `A = U diag(s) V^T`, singular values non-increasing.
pub struct Svd<T: RealField> {
    pub u: Mat<T>,
    pub s: Vec<T>,
    pub v: Mat<T>,
}

pub fn thin_svd<T: RealField>(a: MatRef<'_, T>, par: Par) -> Result<Svd<T>> {
    let (m, n) = a.shape();
    let k = m.min(n);
    let mut u = Mat::zeros(m, k);
    let mut v = Mat::zeros(n, k);
    let mut s = Diag::zeros(k);
    if k > 0 {
        let req = svd::svd_scratch::<T>(m, n, ComputeSvdVectors::Thin, ComputeSvdVectors::Thin, par, Default::default());
        svd::svd(a, s.as_mut(), Some(u.as_mut()), Some(v.as_mut()), par, MemStack::new(&mut MemBuffer::new(req)), Default::default())
            .map_err(|e| Error::Numerical(format!("SVD of a {m} x {n} matrix did not converge ({e:?})")))?;
    }
    let s = s.column_vector().iter().cloned().collect();
    Ok(Svd { u, s, v })
}

/// `X^T X` (the Gram matrix of X's columns), full and symmetric; the product is computed for
/// the lower triangle only and mirrored.
pub fn gram<T: RealField>(x: MatRef<'_, T>, par: Par) -> Mat<T> {
    let n = x.ncols();
    let mut g = Mat::zeros(n, n);
    tri::matmul(
        g.as_mut(),
        BlockStructure::TriangularLower,
        Accum::Replace,
        x.transpose(),
        BlockStructure::Rectangular,
        x,
        BlockStructure::Rectangular,
        T::one_impl(),
        par,
    );
    for j in 0..n {
        for i in 0..j {
            g[(i, j)] = g[(j, i)].clone();
        }
    }
    g
}

/// Lower Cholesky factor `L` of a symmetric positive semi-definite `g` (`L L^T = g + jitter`):
/// `jitter` is added to the diagonal first, and any pivot that still falls below it is replaced
/// by it, so rank-deficient Gram matrices factor too. The strict upper triangle is zero.
pub fn cholesky_psd(mut g: Mat<f64>, jitter: f64, par: Par) -> Result<Mat<f64>> {
    let n = g.nrows();
    for i in 0..n {
        g[(i, i)] += jitter;
    }
    let reg = llt::LltRegularization { dynamic_regularization_delta: jitter, dynamic_regularization_epsilon: jitter };
    let req = llt::cholesky_in_place_scratch::<f64>(n, par, Default::default());
    llt::cholesky_in_place(g.as_mut(), reg, par, MemStack::new(&mut MemBuffer::new(req)), Default::default())
        .map_err(|e| Error::Numerical(format!("Cholesky factorisation of a {n} x {n} Gram matrix failed ({e:?})")))?;
    for j in 0..n {
        for i in 0..j {
            g[(i, j)] = 0.0;
        }
    }
    Ok(g)
}

/// `L^T X` for lower triangular `L`.
pub fn lower_t_mul(l: MatRef<'_, f64>, x: MatRef<'_, f64>, par: Par) -> Mat<f64> {
    let mut out = Mat::zeros(l.ncols(), x.ncols());
    tri::matmul(
        out.as_mut(),
        BlockStructure::Rectangular,
        Accum::Replace,
        l.transpose(),
        BlockStructure::TriangularUpper,
        x,
        BlockStructure::Rectangular,
        1.0,
        par,
    );
    out
}

/// `L X` for lower triangular `L`.
pub fn lower_mul(l: MatRef<'_, f64>, x: MatRef<'_, f64>, par: Par) -> Mat<f64> {
    let mut out = Mat::zeros(l.nrows(), x.ncols());
    tri::matmul(
        out.as_mut(),
        BlockStructure::Rectangular,
        Accum::Replace,
        l,
        BlockStructure::TriangularLower,
        x,
        BlockStructure::Rectangular,
        1.0,
        par,
    );
    out
}

/// Solves `L Y = X` for lower triangular `L`, in place.
pub fn solve_lower_in_place(l: MatRef<'_, f64>, x: MatMut<'_, f64>, par: Par) {
    triangular_solve::solve_lower_triangular_in_place(l, x, par);
}

/// Solves `L^T Y = X` for lower triangular `L`, in place.
pub fn solve_lower_t_in_place(l: MatRef<'_, f64>, x: MatMut<'_, f64>, par: Par) {
    triangular_solve::solve_upper_triangular_in_place(l.transpose(), x, par);
}

/// Eigendecomposition of a symmetric matrix: eigenvalues in non-increasing order and the
/// matching eigenvectors as columns.
pub fn symmetric_eigen(h: MatRef<'_, f64>, par: Par) -> Result<(Vec<f64>, Mat<f64>)> {
    let n = h.nrows();
    let mut s = Diag::<f64>::zeros(n);
    let mut u = Mat::<f64>::zeros(n, n);
    if n > 0 {
        let req = evd::self_adjoint_evd_scratch::<f64>(n, ComputeEigenvectors::Yes, par, Default::default());
        evd::self_adjoint_evd(h, s.as_mut(), Some(u.as_mut()), par, MemStack::new(&mut MemBuffer::new(req)), Default::default())
            .map_err(|e| Error::Numerical(format!("eigendecomposition of a {n} x {n} matrix did not converge ({e:?})")))?;
    }
    // faer sorts ascending.
    let vals: Vec<f64> = s.column_vector().iter().rev().copied().collect();
    let vecs = Mat::from_fn(n, n, |i, j| u[(i, n - 1 - j)]);
    Ok((vals, vecs))
}

/// `||B A||_F^2` from the factors alone: `trace((B^T B)(A A^T))`, for row-major `B` (out x r)
/// and `A` (r x in), accumulated in f64.
pub fn factor_norm2(b: &[f32], a: &[f32], rank: usize, n_in: usize, n_out: usize) -> f64 {
    factor_inner(b, a, rank, b, a, rank, n_in, n_out)
}

/// `<B1 A1, B2 A2>_F = trace((B1^T B2)(A2 A1^T))` from the factors alone (no out x in matrix).
#[allow(clippy::too_many_arguments)]
pub fn factor_inner(b1: &[f32], a1: &[f32], r1: usize, b2: &[f32], a2: &[f32], r2: usize, n_in: usize, n_out: usize) -> f64 {
    if r1 == 0 || r2 == 0 {
        return 0.0;
    }
    // B^T is the column-major view of row-major B; A^T likewise.
    let bt1 = view_t(b1, n_out, r1); // r1 x out
    let bt2 = view_t(b2, n_out, r2); // r2 x out
    let at1 = view_t(a1, r1, n_in); // in x r1
    let at2 = view_t(a2, r2, n_in); // in x r2
    let gb = mul(bt1, bt2.transpose(), Par::Seq); // r1 x r2 = B1^T B2
    let ga = mul(at1.transpose(), at2, Par::Seq); // r1 x r2 = A1 A2^T
                                                  // trace((B1^T B2)(A2 A1^T)) = sum_ab (B1^T B2)_ab (A1 A2^T)_ab
    let mut sum = 0f64;
    for j in 0..r2 {
        for i in 0..r1 {
            sum += gb[(i, j)] as f64 * ga[(i, j)] as f64;
        }
    }
    sum
}
