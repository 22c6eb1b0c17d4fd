//! Present so that `[build-dependencies]` (features of proc-macro and
//! build-script dependencies) take part in feature unification.
fn main() {}
