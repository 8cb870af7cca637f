//! The e-graph analysis: per e-class dtype and shape, and the value when it is a known constant.
//!
//! It also owns the side tables behind the language's leaves (graph inputs and constants, interned
//! attribute maps, opaque ops), so appliers and the cost function can read them through
//! `egraph.analysis`. Types of classes built from the graph come from the graph; classes that rules
//! create get types from the small inference here. Constant folding happens in `modify` (as in egg's
//! `math.rs`): a class whose value is known gets a constant leaf, which extraction then prefers.

use super::language::{AttrsRef, LeafRef, OpaqueRef, QccLang};
use super::rules::constant_folding;
use crate::const_eval::reshape_dims;
use egg::{Analysis, DidMerge, EGraph, Id};
use qcc_ir::{Attrs, DType, Dim, Op, Shape, Tensor, TensorType};
use std::collections::HashMap;

pub type QccEGraph = EGraph<QccLang, QccAnalysis>;

/// What a leaf stands for.
#[derive(Clone, Debug)]
pub enum LeafInfo {
    /// The graph input at this position of `Graph::graph_inputs`.
    Input {
        index: usize,
        name: String,
        ty: TensorType,
    },
    Constant {
        tensor: Tensor,
        name: Option<String>,
    },
}

/// One output port of an op kept opaque.
#[derive(Clone, Debug)]
pub struct OpaqueInfo {
    pub op: Op,
    pub port: u32,
    /// Shared by all ports of identical nodes, so rebuilding creates one node for all of them.
    pub group: u32,
    pub num_outputs: usize,
    pub output_types: Vec<TensorType>,
    pub node_name: String,
}

/// Per e-class facts.
#[derive(Clone, Debug, Default)]
pub struct Meta {
    pub ty: Option<TensorType>,
    pub constant: Option<Tensor>,
}

#[derive(Debug)]
pub struct QccAnalysis {
    pub leaves: Vec<LeafInfo>,
    pub attrs: Vec<Attrs>,
    attrs_index: HashMap<String, u32>,
    pub opaque: Vec<OpaqueInfo>,
    groups: HashMap<String, u32>,
    group_refs: Vec<Vec<OpaqueRef>>,
    small_constants: HashMap<(DType, Vec<usize>, Vec<u8>), u32>,
    /// Largest constant (in elements) the analysis computes.
    pub fold_limit: usize,
    /// Number of classes that received a folded constant.
    pub folds: usize,
}

/// Constants up to this many elements are deduplicated by content.
const DEDUP_ELEMENTS: usize = 64;

impl QccAnalysis {
    pub fn new(fold_limit: usize) -> QccAnalysis {
        QccAnalysis {
            leaves: Vec::new(),
            attrs: Vec::new(),
            attrs_index: HashMap::new(),
            opaque: Vec::new(),
            groups: HashMap::new(),
            group_refs: Vec::new(),
            small_constants: HashMap::new(),
            fold_limit,
            folds: 0,
        }
    }

    pub fn intern_attrs(&mut self, attrs: &Attrs) -> AttrsRef {
        let key = format!("{attrs:?}");
        if let Some(&i) = self.attrs_index.get(&key) {
            return AttrsRef(i);
        }
        let i = self.attrs.len() as u32;
        self.attrs.push(attrs.clone());
        self.attrs_index.insert(key, i);
        AttrsRef(i)
    }

    pub fn attrs_of(&self, r: AttrsRef) -> &Attrs {
        &self.attrs[r.0 as usize]
    }

    pub fn add_input(&mut self, index: usize, name: &str, ty: TensorType) -> LeafRef {
        self.leaves.push(LeafInfo::Input { index, name: name.to_string(), ty });
        LeafRef(self.leaves.len() as u32 - 1)
    }

    /// Interns a constant; small ones are shared by content (so identical constants become one class).
    pub fn add_constant(&mut self, tensor: Tensor, name: Option<String>) -> LeafRef {
        let key = (tensor.numel() <= DEDUP_ELEMENTS)
            .then(|| tensor.bytes().ok().map(|b| (tensor.dtype, tensor.dims.clone(), b.to_vec())))
            .flatten();
        if let Some(key) = &key {
            if let Some(&i) = self.small_constants.get(key) {
                return LeafRef(i);
            }
        }
        self.leaves.push(LeafInfo::Constant { tensor, name });
        let i = self.leaves.len() as u32 - 1;
        if let Some(key) = key {
            self.small_constants.insert(key, i);
        }
        LeafRef(i)
    }

    /// Interns the ports of an opaque node; identical nodes (same op, attributes and output types) share
    /// entries, so their e-nodes hash-cons (common subexpressions merge).
    pub fn add_opaque_node(&mut self, op: &Op, output_types: &[TensorType], node_name: &str) -> Vec<OpaqueRef> {
        let key = format!("{op:?}|{output_types:?}");
        if let Some(&group) = self.groups.get(&key) {
            return self.group_refs[group as usize].clone();
        }
        let group = self.group_refs.len() as u32;
        self.groups.insert(key, group);
        let mut refs = Vec::with_capacity(output_types.len());
        for port in 0..output_types.len() {
            refs.push(OpaqueRef(self.opaque.len() as u32));
            self.opaque.push(OpaqueInfo {
                op: op.clone(),
                port: port as u32,
                group,
                num_outputs: output_types.len(),
                output_types: output_types.to_vec(),
                node_name: node_name.to_string(),
            });
        }
        self.group_refs.push(refs.clone());
        refs
    }

    /// The refs of every port of the node group `group`.
    pub fn group_refs(&self, group: u32) -> &[OpaqueRef] {
        &self.group_refs[group as usize]
    }

    /// The op an e-node stands for (kind and attributes), for structural and opaque nodes.
    pub fn op_of(&self, egraph: &QccEGraph, node: &QccLang) -> Option<Op> {
        if let QccLang::Opaque(r, _) = node {
            return Some(self.opaque[r.0 as usize].op.clone());
        }
        let kind = node.kind()?;
        let attrs_child = *egg::Language::children(node).last()?;
        let attrs = egraph[attrs_child].nodes.iter().find_map(|n| match n {
            QccLang::Attrs(a) => Some(self.attrs_of(*a).clone()),
            _ => None,
        })?;
        Some(Op { kind, attrs })
    }
}

/// The attribute map held by class `id` (the attrs child of a structural node).
pub fn attrs_in(egraph: &QccEGraph, id: Id) -> Option<&Attrs> {
    egraph[id].nodes.iter().find_map(|n| match n {
        QccLang::Attrs(a) => Some(egraph.analysis.attrs_of(*a)),
        _ => None,
    })
}

impl Analysis<QccLang> for QccAnalysis {
    type Data = Meta;

    fn make(egraph: &mut QccEGraph, enode: &QccLang, _id: Id) -> Meta {
        let ty = infer_type(egraph, enode);
        let constant = match enode {
            QccLang::Leaf(r) => match &egraph.analysis.leaves[r.0 as usize] {
                LeafInfo::Constant { tensor, .. } => Some(tensor.clone()),
                LeafInfo::Input { .. } => None,
            },
            _ => constant_folding::fold(egraph, enode),
        };
        // A folded value must agree with the node's type; otherwise it is not used.
        let constant = constant.filter(|t| ty.as_ref().is_none_or(|ty| ty.dtype == t.dtype));
        // A folded value's type is exact; it also fills in types inference could not.
        let ty = match (&constant, ty) {
            (Some(t), None) => Some(TensorType::known(t.dtype, &t.dims)),
            (_, ty) => ty,
        };
        Meta { ty, constant }
    }

    fn merge(&mut self, a: &mut Meta, b: Meta) -> DidMerge {
        let mut changed_a = false;
        let mut changed_b = false;
        match (&a.ty, b.ty) {
            (None, Some(t)) => {
                a.ty = Some(t);
                changed_a = true;
            }
            (Some(_), None) => changed_b = true,
            _ => {}
        }
        match (&a.constant, b.constant) {
            (None, Some(t)) => {
                a.constant = Some(t);
                changed_a = true;
            }
            (Some(_), None) => changed_b = true,
            _ => {}
        }
        DidMerge(changed_a, changed_b)
    }

    fn modify(egraph: &mut QccEGraph, id: Id) {
        let Some(tensor) = egraph[id].data.constant.clone() else { return };
        if egraph[id].nodes.iter().any(|n| matches!(n, QccLang::Leaf(_))) {
            return;
        }
        let leaf = egraph.analysis.add_constant(tensor, None);
        egraph.analysis.folds += 1;
        let leaf_id = egraph.add(QccLang::Leaf(leaf));
        egraph.union(id, leaf_id);
    }
}

fn ty_of(egraph: &QccEGraph, id: Id) -> Option<&TensorType> {
    egraph[id].data.ty.as_ref()
}

fn known_shape(egraph: &QccEGraph, id: Id) -> Option<&Shape> {
    ty_of(egraph, id)?.shape.as_ref()
}

/// Result type of a structural e-node from its children's types (None when it cannot be told).
fn infer_type(egraph: &QccEGraph, enode: &QccLang) -> Option<TensorType> {
    use QccLang as L;
    match enode {
        L::Leaf(r) => match &egraph.analysis.leaves[r.0 as usize] {
            LeafInfo::Input { ty, .. } => Some(ty.clone()),
            LeafInfo::Constant { tensor, .. } => Some(TensorType::known(tensor.dtype, &tensor.dims)),
        },
        L::Opaque(r, _) => {
            let info = &egraph.analysis.opaque[r.0 as usize];
            info.output_types.get(info.port as usize).cloned()
        }
        L::Absent | L::Attrs(_) => None,
        L::Add([a, b, _]) | L::Sub([a, b, _]) | L::Mul([a, b, _]) | L::Div([a, b, _]) => {
            let dtype = ty_of(egraph, *a)?.dtype;
            let shape = broadcast(known_shape(egraph, *a)?, known_shape(egraph, *b)?)?;
            Some(TensorType::new(dtype, shape))
        }
        L::Neg([a, _]) => ty_of(egraph, *a).cloned(),
        L::MatMul([a, b, _]) => {
            let dtype = ty_of(egraph, *a)?.dtype;
            let (sa, sb) = (known_shape(egraph, *a)?, known_shape(egraph, *b)?);
            let (ra, rb) = (sa.rank(), sb.rank());
            if ra < 2 || rb < 2 {
                return None;
            }
            let batch = broadcast(&Shape(sa.0[..ra - 2].to_vec()), &Shape(sb.0[..rb - 2].to_vec()))?;
            let mut dims = batch.0;
            dims.push(sa.0[ra - 2].clone());
            dims.push(sb.0[rb - 1].clone());
            Some(TensorType::new(dtype, Shape(dims)))
        }
        L::Gemm([a, b, _, attrs]) => {
            let attrs = attrs_in(egraph, *attrs)?;
            let flag = |k: &str| matches!(attrs.get(k), Some(qcc_ir::Attr::Int(v)) if *v != 0);
            let dtype = ty_of(egraph, *a)?.dtype;
            let (sa, sb) = (known_shape(egraph, *a)?, known_shape(egraph, *b)?);
            if sa.rank() != 2 || sb.rank() != 2 {
                return None;
            }
            let m = if flag("transA") { &sa.0[1] } else { &sa.0[0] };
            let n = if flag("transB") { &sb.0[0] } else { &sb.0[1] };
            Some(TensorType::new(dtype, Shape(vec![m.clone(), n.clone()])))
        }
        L::Transpose([x, attrs]) => {
            let t = ty_of(egraph, *x)?;
            let shape = t.shape.as_ref()?;
            let perm = transpose_perm(attrs_in(egraph, *attrs)?, shape.rank())?;
            Some(TensorType::new(t.dtype, Shape(perm.iter().map(|&p| shape.0[p].clone()).collect())))
        }
        L::Reshape([x, target, attrs]) => {
            let t = ty_of(egraph, *x)?;
            let spec = egraph[*target].data.constant.as_ref()?.to_i64_vec().ok()?;
            let allow_zero =
                matches!(attrs_in(egraph, *attrs)?.get("allowzero"), Some(qcc_ir::Attr::Int(v)) if *v != 0);
            Some(TensorType::new(t.dtype, reshape_shape(t.shape.as_ref()?, &spec, allow_zero)?))
        }
        L::Quantize([x, _, attrs]) => {
            let to = match attrs_in(egraph, *attrs)?.get("to") {
                Some(qcc_ir::Attr::DType(d)) => *d,
                _ => return None,
            };
            Some(TensorType { dtype: to, shape: ty_of(egraph, *x)?.shape.clone() })
        }
        // The float type of a dequantize and the output type of the ONNX forms come from the graph.
        L::Dequantize(_) | L::QuantizeLinear(_) | L::DequantizeLinear(_) => None,
    }
}

/// The permutation of a transpose (ONNX default: reversed axes), validated against the rank.
pub fn transpose_perm(attrs: &Attrs, rank: usize) -> Option<Vec<usize>> {
    let perm: Vec<usize> = match attrs.get("perm") {
        Some(qcc_ir::Attr::Ints(p)) => {
            p.iter().map(|&x| usize::try_from(if x < 0 { x + rank as i64 } else { x }).ok()).collect::<Option<_>>()?
        }
        None => (0..rank).rev().collect(),
        Some(_) => return None,
    };
    let mut seen = vec![false; rank];
    for &p in &perm {
        if p >= rank || std::mem::replace(&mut seen[p], true) {
            return None;
        }
    }
    (perm.len() == rank).then_some(perm)
}

/// Numpy broadcasting over symbolic dims: equal dims, or one side 1. Unknown dims stay unknown.
pub fn broadcast(a: &Shape, b: &Shape) -> Option<Shape> {
    let rank = a.rank().max(b.rank());
    let one = Dim::Known(1);
    let dim = |s: &Shape, i: usize| -> Dim {
        let off = rank - s.rank();
        if i < off {
            one.clone()
        } else {
            s.0[i - off].clone()
        }
    };
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let (x, y) = (dim(a, i), dim(b, i));
        out.push(if x == y || y == one {
            x
        } else if x == one {
            y
        } else if x == Dim::Unknown || y == Dim::Unknown {
            Dim::Unknown
        } else {
            return None;
        });
    }
    Some(Shape(out))
}

/// ONNX Reshape over symbolic input dims: 0 copies the input dim; -1 is computed when the input is
/// fully known and is unknown otherwise.
pub fn reshape_shape(input: &Shape, spec: &[i64], allow_zero: bool) -> Option<Shape> {
    if let Some(dims) = input.as_known() {
        return reshape_dims(&dims, spec, allow_zero).ok().map(|d| Shape::known(&d));
    }
    let mut out = Vec::with_capacity(spec.len());
    for (i, &s) in spec.iter().enumerate() {
        out.push(match s {
            0 if !allow_zero => input.0.get(i)?.clone(),
            -1 => Dim::Unknown,
            s if s >= 0 => Dim::Known(s as u64),
            _ => return None,
        });
    }
    Some(Shape(out))
}
