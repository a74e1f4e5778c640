//! TEMPORARY (console-pages, until the console-core skeleton is merged).
pub mod chart;
pub mod csv;
