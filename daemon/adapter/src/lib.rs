//! dermascope-adapter (in progress).
