//! Arithmetic on symbolic dimensions: numpy broadcasting, sums and products. A symbol stands for one
//! unknown extent shared across the graph, so `batch` meets `batch` exactly, while two different symbols
//! (or a symbol and an unknown) give `Dim::Unknown` rather than a guess.

use crate::{Dim, Shape};

/// Broadcasts two dimensions; `None` when they cannot be broadcast (two different known extents, neither 1).
pub fn broadcast_dim(a: &Dim, b: &Dim) -> Option<Dim> {
    Some(match (a, b) {
        (Dim::Known(1), other) | (other, Dim::Known(1)) => other.clone(),
        (Dim::Known(x), Dim::Known(y)) => {
            if x != y {
                return None;
            }
            Dim::Known(*x)
        }
        // Whether the symbol is 1 or equals n at run time, the result is n.
        (Dim::Known(n), _) | (_, Dim::Known(n)) => Dim::Known(*n),
        (Dim::Sym(x), Dim::Sym(y)) if x == y => a.clone(),
        _ => Dim::Unknown,
    })
}

/// Numpy (multidirectional) broadcasting of two shapes; `Err((i, a, b))` names the first clash, counted
/// from the right.
pub fn broadcast_shapes(a: &Shape, b: &Shape) -> Result<Shape, (Dim, Dim)> {
    let rank = a.rank().max(b.rank());
    let mut dims = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = if i + a.rank() >= rank { &a.0[i + a.rank() - rank] } else { &Dim::Known(1) };
        let db = if i + b.rank() >= rank { &b.0[i + b.rank() - rank] } else { &Dim::Known(1) };
        dims.push(broadcast_dim(da, db).ok_or_else(|| (da.clone(), db.clone()))?);
    }
    Ok(Shape(dims))
}

/// Sum of dimensions: exact when all are known; a lone symbol plus zeros stays that symbol.
pub fn dim_sum<'a>(dims: impl IntoIterator<Item = &'a Dim>) -> Dim {
    combine(dims, 0, |acc, n| acc.checked_add(n))
}

/// Product of dimensions: exact when all are known; a lone symbol times ones stays that symbol.
pub fn dim_product<'a>(dims: impl IntoIterator<Item = &'a Dim>) -> Dim {
    combine(dims, 1, |acc, n| acc.checked_mul(n))
}

fn combine<'a>(dims: impl IntoIterator<Item = &'a Dim>, identity: u64, op: impl Fn(u64, u64) -> Option<u64>) -> Dim {
    let mut known = identity;
    let mut symbol: Option<&Dim> = None;
    let mut symbols = 0;
    for d in dims {
        match d {
            Dim::Known(n) => match op(known, *n) {
                Some(v) => known = v,
                None => return Dim::Unknown,
            },
            Dim::Sym(_) => {
                symbols += 1;
                symbol = Some(d);
            }
            Dim::Unknown => return Dim::Unknown,
        }
    }
    match (symbols, symbol) {
        (0, _) => Dim::Known(known),
        (1, Some(s)) if known == identity => s.clone(),
        // A product with a known zero factor is zero whatever the symbols are.
        _ if identity == 1 && known == 0 => Dim::Known(0),
        _ => Dim::Unknown,
    }
}

/// `total / (product of parts)` as for Reshape's -1 and even splits: cancels symbols that appear on both
/// sides, and is exact for known extents.
pub fn dim_quotient(total: &[Dim], parts: &[Dim]) -> Dim {
    let mut num_known: u64 = 1;
    let mut num_syms: Vec<&Dim> = Vec::new();
    for d in total {
        match d {
            Dim::Known(n) => {
                num_known = match num_known.checked_mul(*n) {
                    Some(v) => v,
                    None => return Dim::Unknown,
                }
            }
            Dim::Sym(_) => num_syms.push(d),
            Dim::Unknown => return Dim::Unknown,
        }
    }
    let mut den_known: u64 = 1;
    for d in parts {
        match d {
            Dim::Known(n) => {
                den_known = match den_known.checked_mul(*n) {
                    Some(v) => v,
                    None => return Dim::Unknown,
                }
            }
            Dim::Sym(_) => match num_syms.iter().position(|s| *s == d) {
                Some(i) => {
                    num_syms.remove(i);
                }
                None => return Dim::Unknown,
            },
            Dim::Unknown => return Dim::Unknown,
        }
    }
    if den_known == 0 || !num_known.is_multiple_of(den_known) {
        return Dim::Unknown;
    }
    let ratio = num_known / den_known;
    match num_syms.as_slice() {
        [] => Dim::Known(ratio),
        [s] if ratio == 1 => (*s).clone(),
        _ => Dim::Unknown,
    }
}

/// The more specific of two descriptions of the same dimension (known beats symbolic beats unknown), or
/// `None` when they contradict each other.
pub fn unify_dim(a: &Dim, b: &Dim) -> Option<Dim> {
    Some(match (a, b) {
        (Dim::Known(x), Dim::Known(y)) => {
            if x != y {
                return None;
            }
            a.clone()
        }
        (Dim::Known(_), _) => a.clone(),
        (_, Dim::Known(_)) => b.clone(),
        (Dim::Sym(_), _) => a.clone(),
        (_, Dim::Sym(_)) => b.clone(),
        _ => Dim::Unknown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(dims: &[&str]) -> Shape {
        Shape(
            dims.iter()
                .map(|d| match d.parse::<u64>() {
                    Ok(n) => Dim::Known(n),
                    Err(_) if *d == "?" => Dim::Unknown,
                    Err(_) => Dim::sym(d),
                })
                .collect(),
        )
    }

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(broadcast_shapes(&s(&["batch", "1", "4"]), &s(&["3", "1"])).unwrap(), s(&["batch", "3", "4"]));
        assert_eq!(broadcast_shapes(&s(&["seq"]), &s(&["seq"])).unwrap(), s(&["seq"]));
        assert_eq!(broadcast_shapes(&s(&["seq"]), &s(&["kv"])).unwrap(), s(&["?"]));
        assert_eq!(broadcast_shapes(&s(&["seq"]), &s(&["5"])).unwrap(), s(&["5"]));
        assert!(broadcast_shapes(&s(&["3"]), &s(&["4"])).is_err());
        assert_eq!(broadcast_shapes(&s(&[]), &s(&["2", "2"])).unwrap(), s(&["2", "2"]));
    }

    #[test]
    fn sums_products_quotients() {
        let b = Dim::sym("b");
        assert_eq!(dim_product([&Dim::Known(1), &b]), b);
        assert_eq!(dim_product([&Dim::Known(2), &b]), Dim::Unknown);
        assert_eq!(dim_product([&Dim::Known(2), &Dim::Known(3)]), Dim::Known(6));
        assert_eq!(dim_sum([&Dim::Known(0), &b]), b);
        assert_eq!(dim_sum([&Dim::Known(3), &Dim::Known(4)]), Dim::Known(7));
        // [b, seq, 576] reshaped to [b, -1, 9, 64] gives seq.
        let total = [b.clone(), Dim::sym("seq"), Dim::Known(576)];
        assert_eq!(dim_quotient(&total, &[b.clone(), Dim::Known(9), Dim::Known(64)]), Dim::sym("seq"));
        assert_eq!(dim_quotient(&total, &[Dim::Known(576)]), Dim::Unknown);
        assert_eq!(dim_quotient(&[Dim::Known(12)], &[Dim::Known(5)]), Dim::Unknown);
    }
}
