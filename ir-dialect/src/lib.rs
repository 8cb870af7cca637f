//! qcc's intermediate representation: a typed dataflow graph with first-class quantization.
//!
//! Data only, as in Cranelift: the graph ([`Graph`]), element types ([`DType`]), shapes with symbolic
//! dimensions ([`Shape`]), operations ([`Op`]) and zero-copy constants ([`Tensor`]). Beside it: type
//! inference ([`infer`]), the verifier ([`verify()`]) and the `.qir` text format ([`text`]).

mod dtype;
mod graph;
pub mod hadamard;
pub mod infer;
pub mod lane_sum;
mod op;
mod shape;
mod tensor;
pub mod text;
pub mod verify;

pub use dtype::DType;
pub use graph::{Edge, Graph, GraphError, GraphOutput, Node, NodeId, TensorType, Value, ValueInfo};
pub use infer::{infer_types, InferError};
pub use lane_sum::lane_sum;
pub use op::{Arity, Attr, Attrs, Op, OpKind, OutputQuant};
pub use shape::{Dim, Shape};
pub use tensor::{
    f32_to_f8e4m3, f8e4m3_to_f32, nibble, pack_nibbles, sign_extend_nibble, Element, Tensor, TensorData, TensorError,
};
pub use verify::{verify, VerifyError, VerifyIssue};
