//! qcc passes: one pass per file, the registry and the pass manager (arrive with the pass-system issue).
