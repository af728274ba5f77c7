//! Placeholder, replaced by the benchmark tool.
fn main() {}
