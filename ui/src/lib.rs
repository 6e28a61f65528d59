//! dermascope-ui (in progress).
