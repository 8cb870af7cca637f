//! Value propagation for shape arithmetic. Exporters compute reshape targets and slice bounds at run time
//! (`Concat(Gather(Shape(x), 0), [9], [64])`); tracking the contents of small integer tensors, with
//! symbolic dimensions as elements, lets inference see through that arithmetic.

use super::Ctx;
use crate::{DType, Dim, OpKind, TensorType};
use std::sync::Arc;

/// Largest tensor whose contents are tracked; shape arithmetic never needs more.
pub const MAX_TRACKED: usize = 64;

/// One tracked integer element.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SymInt {
    Known(i64),
    Sym(Arc<str>),
    Unknown,
}

impl SymInt {
    pub fn from_dim(d: &Dim) -> SymInt {
        match d {
            Dim::Known(n) => i64::try_from(*n).map(SymInt::Known).unwrap_or(SymInt::Unknown),
            Dim::Sym(s) => SymInt::Sym(s.clone()),
            Dim::Unknown => SymInt::Unknown,
        }
    }

    /// As an extent; negative values are not extents.
    pub fn to_dim(&self) -> Dim {
        match self {
            SymInt::Known(n) => u64::try_from(*n).map(Dim::Known).unwrap_or(Dim::Unknown),
            SymInt::Sym(s) => Dim::Sym(s.clone()),
            SymInt::Unknown => Dim::Unknown,
        }
    }

    pub fn known(&self) -> Option<i64> {
        match self {
            SymInt::Known(n) => Some(*n),
            _ => None,
        }
    }
}

/// Contents of one tracked tensor (rank 0 or 1), flattened.
pub type Contents = Vec<SymInt>;

fn tracks(ty: &TensorType) -> bool {
    (ty.dtype.is_int() || ty.dtype == DType::Bool) && ty.shape.as_ref().is_some_and(|s| s.rank() <= 1)
}

/// Contents of the node's single output, computed from its inputs' tracked contents, or `None`.
pub(crate) fn propagate(ctx: &Ctx<'_>, out: &TensorType) -> Option<Contents> {
    if !tracks(out) {
        return None;
    }
    let op = &ctx.node.op;
    let contents = match op.kind {
        OpKind::Constant => {
            let t = op.tensor("value")?;
            if t.dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none_or(|n| n > MAX_TRACKED) {
                return None;
            }
            t.to_i64_vec().ok()?.into_iter().map(SymInt::Known).collect()
        }
        OpKind::Shape => {
            let shape = ctx.ty(0)?.shape.as_ref()?;
            let (start, end) = super::shape_ops::shape_range(op, shape.rank());
            shape.0[start..end].iter().map(SymInt::from_dim).collect()
        }
        OpKind::Size => vec![match super::dims::dim_product(ctx.ty(0)?.shape.as_ref()?.dims()) {
            Dim::Known(n) => SymInt::Known(i64::try_from(n).ok()?),
            d => SymInt::from_dim(&d),
        }],
        OpKind::Identity | OpKind::Squeeze | OpKind::Unsqueeze | OpKind::Reshape => ctx.contents(0)?.clone(),
        OpKind::Cast => {
            let src = ctx.contents(0)?;
            if op.dtype("to") == Some(DType::Bool) {
                src.iter().map(|v| map1(v, |n| Some((n != 0) as i64))).collect()
            } else {
                src.clone()
            }
        }
        OpKind::Gather => {
            let data = ctx.contents(0)?;
            let indices = ctx.contents(1)?;
            if ctx.ty(0)?.shape.as_ref()?.rank() != 1 {
                return None;
            }
            indices
                .iter()
                .map(|i| {
                    let i = i.known()?;
                    let i = if i < 0 { i + data.len() as i64 } else { i };
                    data.get(usize::try_from(i).ok()?).cloned()
                })
                .collect::<Option<Vec<_>>>()?
        }
        OpKind::Slice => {
            let data = ctx.contents(0)?;
            let n = data.len() as i64;
            let single = |port: usize| -> Option<i64> {
                let v = ctx.known_ints(port)?;
                (v.len() == 1).then(|| v[0])
            };
            let (start, end) = (single(1)?, single(2)?);
            if let Some(axes) = ctx.input(3).and_then(|_| ctx.known_ints(3)) {
                if axes != [0] && axes != [-1] {
                    return None;
                }
            }
            let step = if ctx.input(4).is_some() { single(4)? } else { 1 };
            slice_indices(n, start, end, step)?.into_iter().map(|i| data[i].clone()).collect()
        }
        OpKind::Concat => {
            let mut all = Vec::new();
            for port in 0..ctx.num_inputs() {
                all.extend(ctx.contents(port)?.iter().cloned());
            }
            if all.len() > MAX_TRACKED {
                return None;
            }
            all
        }
        OpKind::Add | OpKind::Sub | OpKind::Mul | OpKind::Div | OpKind::Mod | OpKind::Max | OpKind::Min => {
            let (a, b) = (ctx.contents(0)?, ctx.contents(1)?);
            zip_broadcast(a, b, |x, y| arith(op.kind, x, y))?
        }
        OpKind::Equal | OpKind::Less | OpKind::Greater | OpKind::LessOrEqual | OpKind::GreaterOrEqual => {
            let (a, b) = (ctx.contents(0)?, ctx.contents(1)?);
            zip_broadcast(a, b, |x, y| compare(op.kind, x, y))?
        }
        OpKind::Not => ctx.contents(0)?.iter().map(|v| map1(v, |n| Some((n == 0) as i64))).collect(),
        OpKind::Where => {
            let (c, x, y) = (ctx.contents(0)?, ctx.contents(1)?, ctx.contents(2)?);
            let len = c.len().max(x.len()).max(y.len());
            if [c, x, y].iter().any(|v| v.len() != 1 && v.len() != len) {
                return None;
            }
            let at = |v: &Contents, i: usize| if v.len() == 1 { v[0].clone() } else { v[i].clone() };
            (0..len)
                .map(|i| match at(c, i).known() {
                    Some(0) => at(y, i),
                    Some(_) => at(x, i),
                    None => SymInt::Unknown,
                })
                .collect()
        }
        OpKind::Range => {
            let (start, limit, delta) = (ctx.scalar(0)?, ctx.scalar(1)?, ctx.scalar(2)?);
            let len = range_len(start, limit, delta)?;
            if len > MAX_TRACKED as u64 {
                return None;
            }
            (0..len as i128)
                .map(|i| i64::try_from(start as i128 + i * delta as i128).map(SymInt::Known).unwrap_or(SymInt::Unknown))
                .collect()
        }
        OpKind::ConstantOfShape => {
            let shape = ctx.known_ints(0)?;
            let count = shape.iter().try_fold(1i64, |a, &d| a.checked_mul(d)).unwrap_or(-1);
            if count < 0 || count as usize > MAX_TRACKED {
                return None;
            }
            let fill = match op.tensor("value") {
                Some(t) => *t.to_i64_vec().ok()?.first()?,
                None => 0,
            };
            vec![SymInt::Known(fill); count as usize]
        }
        OpKind::Expand => {
            let data = ctx.contents(0)?;
            let shape = ctx.known_ints(1)?;
            let len = match shape.as_slice() {
                [] => 1,
                [n] => (*n).max(data.len() as i64),
                _ => return None,
            };
            match data.len() {
                1 if (0..=MAX_TRACKED as i64).contains(&len) => vec![data[0].clone(); len as usize],
                n if n as i64 == len => data.clone(),
                _ => return None,
            }
        }
        _ => return None,
    };
    // The contents must agree with the element count of the inferred type.
    let shape = out.shape.as_ref()?;
    match shape.dims() {
        [] if contents.len() == 1 => Some(contents),
        [Dim::Known(n)] if *n as usize == contents.len() => Some(contents),
        [Dim::Sym(_) | Dim::Unknown] => Some(contents),
        _ => None,
    }
}

fn map1(v: &SymInt, f: impl Fn(i64) -> Option<i64>) -> SymInt {
    v.known().and_then(f).map(SymInt::Known).unwrap_or(SymInt::Unknown)
}

fn zip_broadcast(a: &Contents, b: &Contents, f: impl Fn(&SymInt, &SymInt) -> SymInt) -> Option<Contents> {
    match (a.len(), b.len()) {
        (x, y) if x == y => Some(a.iter().zip(b).map(|(x, y)| f(x, y)).collect()),
        (1, _) => Some(b.iter().map(|y| f(&a[0], y)).collect()),
        (_, 1) => Some(a.iter().map(|x| f(x, &b[0])).collect()),
        _ => None,
    }
}

fn arith(kind: OpKind, x: &SymInt, y: &SymInt) -> SymInt {
    use SymInt::Known;
    match (kind, x, y) {
        (OpKind::Add, Known(a), Known(b)) => a.checked_add(*b).map(Known).unwrap_or(SymInt::Unknown),
        (OpKind::Sub, Known(a), Known(b)) => a.checked_sub(*b).map(Known).unwrap_or(SymInt::Unknown),
        (OpKind::Mul, Known(a), Known(b)) => a.checked_mul(*b).map(Known).unwrap_or(SymInt::Unknown),
        // ONNX integer Div truncates toward zero (C semantics), as Rust's does.
        (OpKind::Div, Known(a), Known(b)) => a.checked_div(*b).map(Known).unwrap_or(SymInt::Unknown),
        // Mod with fmod=0 (the integer default) takes the divisor's sign, like Python.
        (OpKind::Mod, Known(a), Known(b)) => match a.checked_rem_euclid(*b) {
            Some(r) if *b < 0 && r != 0 => Known(r + b),
            Some(r) => Known(r),
            None => SymInt::Unknown,
        },
        (OpKind::Max, Known(a), Known(b)) => Known(*a.max(b)),
        (OpKind::Min, Known(a), Known(b)) => Known(*a.min(b)),
        (OpKind::Add | OpKind::Sub, s @ SymInt::Sym(_), Known(0)) => s.clone(),
        (OpKind::Add, Known(0), s @ SymInt::Sym(_)) => s.clone(),
        (OpKind::Mul | OpKind::Div, s @ SymInt::Sym(_), Known(1)) => s.clone(),
        (OpKind::Mul, Known(1), s @ SymInt::Sym(_)) => s.clone(),
        (OpKind::Sub, SymInt::Sym(a), SymInt::Sym(b)) if a == b => Known(0),
        (OpKind::Div, SymInt::Sym(a), SymInt::Sym(b)) if a == b => Known(1),
        (OpKind::Max | OpKind::Min, SymInt::Sym(a), SymInt::Sym(b)) if a == b => x.clone(),
        _ => SymInt::Unknown,
    }
}

fn compare(kind: OpKind, x: &SymInt, y: &SymInt) -> SymInt {
    match (x, y) {
        (SymInt::Known(a), SymInt::Known(b)) => SymInt::Known(match kind {
            OpKind::Equal => a == b,
            OpKind::Less => a < b,
            OpKind::Greater => a > b,
            OpKind::LessOrEqual => a <= b,
            _ => a >= b,
        } as i64),
        (SymInt::Sym(a), SymInt::Sym(b)) if a == b => {
            SymInt::Known(matches!(kind, OpKind::Equal | OpKind::LessOrEqual | OpKind::GreaterOrEqual) as i64)
        }
        // Extents are never negative, so `dim == -1` (exporters test for it) is false.
        (SymInt::Sym(_), SymInt::Known(n)) | (SymInt::Known(n), SymInt::Sym(_)) if *n < 0 && kind == OpKind::Equal => {
            SymInt::Known(0)
        }
        _ => SymInt::Unknown,
    }
}

/// ONNX Range's element count, `max(ceil((limit - start) / delta), 0)`.
pub fn range_len(start: i64, limit: i64, delta: i64) -> Option<u64> {
    if delta == 0 {
        return None;
    }
    let span = (limit as i128) - (start as i128);
    let d = delta as i128;
    let n = if (span > 0) == (d > 0) && span != 0 { (span + d - d.signum()) / d } else { 0 };
    u64::try_from(n.max(0)).ok()
}

/// Indices selected by ONNX Slice along one axis of extent `n` (starts/ends clamped as the spec says).
pub fn slice_indices(n: i64, start: i64, end: i64, step: i64) -> Option<Vec<usize>> {
    let (first, last) = slice_bounds(n, start, end, step)?;
    let mut out = Vec::new();
    let mut i = first;
    while (step > 0 && i < last) || (step < 0 && i > last) {
        out.push(usize::try_from(i).ok()?);
        i += step;
        if out.len() > MAX_TRACKED * 4 {
            return None;
        }
    }
    Some(out)
}

/// Clamped (start, end) of ONNX Slice along an axis of extent `n`.
pub fn slice_bounds(n: i64, start: i64, end: i64, step: i64) -> Option<(i64, i64)> {
    if step == 0 {
        return None;
    }
    if n <= 0 {
        return Some((0, 0));
    }
    let fix = |v: i64| if v < 0 { v.saturating_add(n) } else { v };
    let (s, e) = (fix(start), fix(end));
    Some(if step > 0 { (s.clamp(0, n), e.clamp(0, n)) } else { (s.clamp(0, n - 1), e.clamp(-1, n - 1)) })
}

/// Element count of an ONNX Slice along an axis of extent `n`.
pub fn slice_len(n: i64, start: i64, end: i64, step: i64) -> Option<u64> {
    let (s, e) = slice_bounds(n, start, end, step)?;
    let (s, e, step) = (s as i128, e as i128, step as i128);
    let count = if step > 0 { (e - s + step - 1) / step } else { (s - e - step - 1) / -step };
    u64::try_from(count.max(0)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_and_range_match_numpy() {
        // numpy: len(range(10)[2:-1:3]) == 3, len(range(10)[::-1]) == 10, len(range(5)[7:]) == 0
        assert_eq!(slice_len(10, 2, -1, 3), Some(3));
        assert_eq!(slice_indices(10, -1, i64::MIN, -1).unwrap().len(), 10);
        assert_eq!(slice_len(5, 7, i64::MAX, 1), Some(0));
        assert_eq!(slice_indices(6, 1, 100, 2), Some(vec![1, 3, 5]));
        // numpy: len(arange(1, 10, 4)) == 3, len(arange(5, 1, -2)) == 2, len(arange(3, 1)) == 0
        assert_eq!(range_len(1, 10, 4), Some(3));
        assert_eq!(range_len(5, 1, -2), Some(2));
        assert_eq!(range_len(3, 1, 1), Some(0));
        assert_eq!(range_len(0, 1, 0), None);
    }

    #[test]
    fn integer_mod_follows_divisor_sign() {
        // Python: -7 % 3 == 2, 7 % -3 == -2
        assert_eq!(arith(OpKind::Mod, &SymInt::Known(-7), &SymInt::Known(3)), SymInt::Known(2));
        assert_eq!(arith(OpKind::Mod, &SymInt::Known(7), &SymInt::Known(-3)), SymInt::Known(-2));
    }
}
