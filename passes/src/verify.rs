//! The verifier the pass manager runs after every pass: `qcc_ir::verify`, re-exported so the manager
//! has one place to call (structure, arity, names and types against `qcc_ir::infer`).

pub use qcc_ir::verify::{verify, VerifyError, VerifyIssue};
