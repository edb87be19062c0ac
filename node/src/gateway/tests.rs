//! Gateway tests: the real router, in process, over the in-memory engine.
