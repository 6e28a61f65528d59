//! dermascope-device (in progress).
