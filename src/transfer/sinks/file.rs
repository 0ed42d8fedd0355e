//! checkpoint file sink (coming)
