//! filled in when the reference vectors land
