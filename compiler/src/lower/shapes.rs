//! Sizes for lowering: IR dims as manifest [`DimExpr`]s (simplified as they are built), numpy
//! broadcasting over them, contiguous and broadcast strides, and evaluation at the symbols' maxima.

use qcc_ir::Dim;
use qcc_runtime::artifact::{DimExpr, SymbolValues};

/// A dimension the IR could not infer (a host-prologue value such as `f32[1,1,?,64]`): resolved
/// against the consumer it broadcasts with, see [`resolve_unknown`].
pub const UNKNOWN: &str = "?";

pub type Dims = Vec<DimExpr>;

pub fn from_ir(dim: &Dim) -> DimExpr {
    match dim {
        Dim::Known(n) => DimExpr::Const(*n as i64),
        Dim::Sym(s) => DimExpr::sym(s),
        Dim::Unknown => DimExpr::sym(UNKNOWN),
    }
}

pub fn is_unknown(d: &DimExpr) -> bool {
    matches!(d, DimExpr::Sym(s) if s == UNKNOWN)
}

pub fn has_unknown(d: &DimExpr) -> bool {
    let mut names = Vec::new();
    d.symbols(&mut names);
    names.iter().any(|n| n == UNKNOWN)
}

pub fn is_one(d: &DimExpr) -> bool {
    matches!(d, DimExpr::Const(1))
}

/// `a * b`, folding constants and ones.
pub fn mul(a: &DimExpr, b: &DimExpr) -> DimExpr {
    match (a, b) {
        (DimExpr::Const(x), DimExpr::Const(y)) => DimExpr::Const(x.saturating_mul(*y)),
        (DimExpr::Const(1), other) | (other, DimExpr::Const(1)) => other.clone(),
        (DimExpr::Const(0), _) | (_, DimExpr::Const(0)) => DimExpr::Const(0),
        _ => DimExpr::mul(a.clone(), b.clone()),
    }
}

/// `a + b`, folding constants and zeros.
pub fn add(a: &DimExpr, b: &DimExpr) -> DimExpr {
    match (a, b) {
        (DimExpr::Const(x), DimExpr::Const(y)) => DimExpr::Const(x.saturating_add(*y)),
        (DimExpr::Const(0), other) | (other, DimExpr::Const(0)) => other.clone(),
        _ => DimExpr::add(a.clone(), b.clone()),
    }
}

/// `e / k` when `e` is provably a multiple of `k` for every symbol value.
pub fn exact_div(e: &DimExpr, k: i64) -> Option<DimExpr> {
    if k == 1 {
        return Some(e.clone());
    }
    match e {
        DimExpr::Const(c) => (c % k == 0).then(|| DimExpr::Const(c / k)),
        DimExpr::Add(a, b) => Some(add(&exact_div(a, k)?, &exact_div(b, k)?)),
        DimExpr::Mul(a, b) => {
            if let Some(a) = exact_div(a, k) {
                return Some(mul(&a, b));
            }
            if let Some(b) = exact_div(b, k) {
                return Some(mul(a, &b));
            }
            // Part of k in a constant factor, the rest in the other: 6 * x is a multiple of 4 when x
            // is one of 2.
            let (c, other) = match (&**a, &**b) {
                (DimExpr::Const(c), other) | (other, DimExpr::Const(c)) => (*c, other),
                _ => return None,
            };
            let g = gcd(c.unsigned_abs(), k.unsigned_abs()) as i64;
            if g <= 1 {
                return None;
            }
            Some(mul(&DimExpr::Const(c / g), &exact_div(other, k / g)?))
        }
        DimExpr::Sym(_) | DimExpr::CeilDiv(..) => None,
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// `ceil(a / b)`, folding constants.
pub fn ceil_div(a: &DimExpr, b: i64) -> DimExpr {
    match a {
        DimExpr::Const(x) => DimExpr::Const(x.div_euclid(b) + i64::from(x.rem_euclid(b) != 0)),
        _ if b == 1 => a.clone(),
        _ => DimExpr::ceil_div(a.clone(), DimExpr::Const(b)),
    }
}

pub fn product(dims: &[DimExpr]) -> DimExpr {
    dims.iter().fold(DimExpr::Const(1), |acc, d| mul(&acc, d))
}

/// Row-major strides (in elements) of a contiguous tensor.
pub fn contiguous_strides(dims: &[DimExpr]) -> Dims {
    let mut strides = vec![DimExpr::Const(1); dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        strides[i] = mul(&strides[i + 1], &dims[i + 1]);
    }
    strides
}

/// Whether two sizes are equal for every value of their symbols: compared structurally, else by
/// evaluating both at two unrelated assignments of distinct primes (sizes are polynomials with
/// ceil-divisions, so a false "equal" would need both to coincide twice).
pub fn same(a: &DimExpr, b: &DimExpr) -> bool {
    if a == b {
        return true;
    }
    let mut names = Vec::new();
    a.symbols(&mut names);
    b.symbols(&mut names);
    let primes = [[7919i64, 104_729, 1_299_709, 15_485_863], [6_007, 49_999, 611_953, 7_368_787]];
    primes.iter().all(|p| {
        let values: SymbolValues =
            names.iter().enumerate().map(|(i, n)| (n.clone(), p[i % p.len()] + i as i64)).collect();
        matches!((a.eval(&values), b.eval(&values)), (Ok(x), Ok(y)) if x == y)
    })
}

/// Whether `strides` describe the contiguous layout of `dims` (dims of extent 1 may have any stride).
pub fn is_contiguous(dims: &[DimExpr], strides: &[DimExpr]) -> bool {
    let expected = contiguous_strides(dims);
    dims.iter().zip(strides).zip(&expected).all(|((d, s), e)| is_one(d) || same(s, e))
}

/// Numpy broadcasting of several shapes; `None` when two extents are known to differ.
/// Unknown extents ([`UNKNOWN`]) defer to any other extent; a symbolic extent matches itself.
pub fn broadcast(shapes: &[&[DimExpr]]) -> Option<Dims> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let mut dim = DimExpr::Const(1);
        for s in shapes {
            let Some(pos) = (i + s.len()).checked_sub(rank) else { continue };
            let d = &s[pos];
            if is_one(d) || is_unknown(d) && !is_one(&dim) {
                continue;
            }
            if is_one(&dim) || is_unknown(&dim) {
                dim = d.clone();
            } else if !same(d, &dim) {
                return None;
            }
        }
        out.push(dim);
    }
    Some(out)
}

/// Replaces unknown extents of `dims` by the extent of `target` at the same (right-aligned) position.
pub fn resolve_unknown(dims: &[DimExpr], target: &[DimExpr]) -> Dims {
    let offset = target.len().saturating_sub(dims.len());
    dims.iter()
        .enumerate()
        .map(
            |(i, d)| {
                if is_unknown(d) {
                    target.get(i + offset).cloned().unwrap_or_else(|| d.clone())
                } else {
                    d.clone()
                }
            },
        )
        .collect()
}

/// Strides to read a tensor of `dims` (with element `strides`) broadcast to `target` (right-aligned):
/// padded dims and broadcast (extent 1) dims get stride 0.
pub fn broadcast_strides(dims: &[DimExpr], strides: &[DimExpr], target: &[DimExpr]) -> Dims {
    let offset = target.len().saturating_sub(dims.len());
    (0..target.len())
        .map(|i| match i.checked_sub(offset) {
            Some(j) if !is_one(&dims[j]) => strides[j].clone(),
            _ => DimExpr::Const(0),
        })
        .collect()
}

/// The value of `d` with every symbol at its maximum.
pub fn at_max(d: &DimExpr, max: &SymbolValues) -> Option<u64> {
    d.eval(max).ok().and_then(|v| u64::try_from(v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &str) -> DimExpr {
        DimExpr::sym(name)
    }
    fn c(v: i64) -> DimExpr {
        DimExpr::Const(v)
    }

    #[test]
    fn strides_and_broadcasting() {
        let dims = [s("batch"), c(9), s("seq"), c(64)];
        let strides = contiguous_strides(&dims);
        assert_eq!(strides[3], c(1));
        assert_eq!(strides[2], c(64));
        assert!(same(&strides[1], &mul(&s("seq"), &c(64))));
        assert!(!same(&s("seq"), &s("batch")));
        assert!(is_contiguous(&dims, &strides));
        let cos = [c(1), c(1), s(UNKNOWN), c(64)];
        let out = broadcast(&[&dims, &cos]).unwrap();
        assert_eq!(out, dims.to_vec());
        let cos = resolve_unknown(&cos, &out);
        assert_eq!(cos[2], s("seq"));
        let bs = broadcast_strides(&cos, &contiguous_strides(&cos), &out);
        assert_eq!(bs, vec![c(0), c(0), c(64), c(1)]);
        assert!(broadcast(&[&[c(3)], &[c(4)]]).is_none());
        assert_eq!(ceil_div(&c(10), 4), c(3));
        let mut max = SymbolValues::new();
        max.insert("batch".into(), 2);
        max.insert("seq".into(), 5);
        assert_eq!(at_max(&product(&dims), &max), Some(2 * 9 * 5 * 64));
    }

    #[test]
    fn exact_division_only_where_every_symbol_value_divides() {
        let mut at = SymbolValues::new();
        at.insert("past".into(), 515);
        at.insert("seq".into(), 3);
        let cases = [
            (mul(&add(&s("past"), &s("seq")), &c(128)), 4, true),
            (mul(&s("seq"), &c(6)), 4, false),
            (mul(&mul(&s("seq"), &c(2)), &c(6)), 4, true),
            (mul(&c(6), &mul(&s("seq"), &c(2))), 4, true),
            (add(&mul(&s("past"), &c(8)), &c(12)), 4, true),
            (add(&mul(&s("past"), &c(8)), &c(6)), 4, false),
            (s("seq"), 4, false),
            (ceil_div(&mul(&s("seq"), &c(64)), 2), 4, false),
            (s("seq"), 1, true),
        ];
        for (e, k, divides) in cases {
            let q = exact_div(&e, k);
            assert_eq!(q.is_some(), divides, "{e} / {k}");
            if let Some(q) = q {
                assert_eq!(q.eval(&at).unwrap() * k, e.eval(&at).unwrap(), "{e} / {k} = {q}");
            }
        }
        // Units fold away: (past + seq) * 128 / 4 prints as a plain product.
        assert_eq!(
            exact_div(&mul(&add(&s("past"), &s("seq")), &c(128)), 4),
            Some(mul(&add(&s("past"), &s("seq")), &c(32)))
        );
    }
}
