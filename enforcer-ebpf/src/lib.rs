#![no_std]
// Exists so that the crate has a library target; the programs are in main.rs.
