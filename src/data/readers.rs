//! Readers of the supported input formats.
