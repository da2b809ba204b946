#![no_main]
bmr_fuzz::target!(bmr::fuzz::xfs);
