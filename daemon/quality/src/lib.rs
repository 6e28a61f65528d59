//! dermascope-quality (in progress).
