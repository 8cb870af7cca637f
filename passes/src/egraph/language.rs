//! The e-graph language: qcc ops as e-nodes.
//!
//! Children are IR values only (plus typed leaves); attributes are one interned `Attrs` leaf, the last
//! child of every structural op, so `(mul ?x ?c ?attrs)` matches any `mul`. Ops the rules look into have
//! their own variant; every other op is `Opaque(op#N, children)` where the side table holds the op, its
//! attributes and which output port the e-node stands for (multi-output nodes become one e-node per
//! port with the same children). Shapes and dtypes live in the analysis, never in the e-nodes.

use egg::{define_language, Id};
use qcc_ir::OpKind;
use std::fmt;
use std::str::FromStr;

macro_rules! table_ref {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u32);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "#{}"), self.0)
            }
        }

        impl FromStr for $name {
            type Err = ();
            fn from_str(s: &str) -> Result<Self, ()> {
                s.strip_prefix(concat!($prefix, "#")).and_then(|n| n.parse().ok()).map($name).ok_or(())
            }
        }
    };
}

table_ref!(
    /// A graph input or a constant (index into `QccAnalysis::leaves`).
    LeafRef, "leaf");
table_ref!(
    /// An interned attribute map (index into `QccAnalysis::attrs`).
    AttrsRef, "attrs");
table_ref!(
    /// One output port of an op without its own variant (index into `QccAnalysis::opaque`).
    OpaqueRef, "op");

define_language! {
    pub enum QccLang {
        "add" = Add([Id; 3]),
        "sub" = Sub([Id; 3]),
        "mul" = Mul([Id; 3]),
        "div" = Div([Id; 3]),
        "neg" = Neg([Id; 2]),
        "matmul" = MatMul([Id; 3]),
        "gemm" = Gemm([Id; 4]),
        "transpose" = Transpose([Id; 2]),
        "reshape" = Reshape([Id; 3]),
        "quantize" = Quantize([Id; 3]),
        "dequantize" = Dequantize([Id; 3]),
        "quantize_linear" = QuantizeLinear([Id; 4]),
        "dequantize_linear" = DequantizeLinear([Id; 4]),
        // An absent optional input.
        "none" = Absent,
        Leaf(LeafRef),
        Attrs(AttrsRef),
        Opaque(OpaqueRef, Vec<Id>),
    }
}

impl QccLang {
    /// The structural variant for `kind` over `children` (inputs, `none` padded, then the attrs leaf),
    /// or `None` when the kind is not modelled structurally or the slot count does not fit.
    pub fn structural(kind: OpKind, children: &[Id]) -> Option<QccLang> {
        use QccLang as L;
        let arr3 = || <[Id; 3]>::try_from(children).ok();
        Some(match kind {
            OpKind::Add => L::Add(arr3()?),
            OpKind::Sub => L::Sub(arr3()?),
            OpKind::Mul => L::Mul(arr3()?),
            OpKind::Div => L::Div(arr3()?),
            OpKind::Neg => L::Neg(children.try_into().ok()?),
            OpKind::MatMul => L::MatMul(arr3()?),
            OpKind::Gemm => L::Gemm(children.try_into().ok()?),
            OpKind::Transpose => L::Transpose(children.try_into().ok()?),
            OpKind::Reshape => L::Reshape(arr3()?),
            OpKind::Quantize => L::Quantize(arr3()?),
            OpKind::Dequantize => L::Dequantize(arr3()?),
            OpKind::QuantizeLinear => L::QuantizeLinear(children.try_into().ok()?),
            OpKind::DequantizeLinear => L::DequantizeLinear(children.try_into().ok()?),
            _ => return None,
        })
    }

    /// Number of input slots (before the attrs leaf) a structural variant of `kind` has.
    pub fn structural_slots(kind: OpKind) -> Option<usize> {
        Some(match kind {
            OpKind::Neg | OpKind::Transpose => 1,
            OpKind::Add | OpKind::Sub | OpKind::Mul | OpKind::Div | OpKind::MatMul => 2,
            OpKind::Reshape | OpKind::Quantize | OpKind::Dequantize => 2,
            OpKind::Gemm | OpKind::QuantizeLinear | OpKind::DequantizeLinear => 3,
            _ => return None,
        })
    }

    /// The op kind of a structural variant.
    pub fn kind(&self) -> Option<OpKind> {
        use QccLang as L;
        Some(match self {
            L::Add(_) => OpKind::Add,
            L::Sub(_) => OpKind::Sub,
            L::Mul(_) => OpKind::Mul,
            L::Div(_) => OpKind::Div,
            L::Neg(_) => OpKind::Neg,
            L::MatMul(_) => OpKind::MatMul,
            L::Gemm(_) => OpKind::Gemm,
            L::Transpose(_) => OpKind::Transpose,
            L::Reshape(_) => OpKind::Reshape,
            L::Quantize(_) => OpKind::Quantize,
            L::Dequantize(_) => OpKind::Dequantize,
            L::QuantizeLinear(_) => OpKind::QuantizeLinear,
            L::DequantizeLinear(_) => OpKind::DequantizeLinear,
            L::Absent | L::Leaf(_) | L::Attrs(_) | L::Opaque(..) => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use egg::Language;

    #[test]
    fn every_structural_kind_round_trips() {
        for &kind in OpKind::ALL {
            let Some(slots) = QccLang::structural_slots(kind) else {
                assert!(QccLang::structural(kind, &[Id::from(0usize); 3]).is_none());
                continue;
            };
            let children = vec![Id::from(0usize); slots + 1];
            let node = QccLang::structural(kind, &children).unwrap();
            assert_eq!(node.kind(), Some(kind));
            assert_eq!(node.children().len(), slots + 1);
        }
        assert_eq!("op#12".parse::<OpaqueRef>(), Ok(OpaqueRef(12)));
        assert!("op#x".parse::<OpaqueRef>().is_err());
    }
}
