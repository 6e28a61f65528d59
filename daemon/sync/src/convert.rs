//! Cases on the wire and in the store.
//!
//! Up: everything the fleet may hold except the free-text note, which
//! never leaves the device ([`dermascope_cloud_api::WireMetadata`] has no
//! field for it); the original photograph only where the clinic allows it.
//! Down: a pulled case is checked against the store before it may be
//! stored (source, encoder, dimension, finiteness, sizes, ids); one that
//! fails is skipped, never stored.

use dermascope_cloud_api::{
    WireCase, WireDiagnosis, WireMetadata, WireSource, MAX_THUMBNAIL_BYTES,
};
use dermascope_store::{
    Case, CaseId, CaseMetadata, CaseSource, Diagnosis, Sex, StoreIdentity, MAX_DEVICE_ID_BYTES,
};

/// The upload form of a stored case; `original` is its photograph where
/// the clinic lets originals leave the device.
pub fn to_wire(case: &Case, original: Option<Vec<u8>>) -> WireCase {
    let m = &case.metadata;
    WireCase {
        id: case.id.as_str().to_owned(),
        revision: case.revision,
        model_id: case.model_id.clone(),
        embedding: case.embedding.clone(),
        diagnosis: WireDiagnosis {
            code: case.diagnosis.code.clone(),
            name: case.diagnosis.display_name.clone(),
        },
        label_confirmed: case.label_confirmed,
        metadata: WireMetadata {
            age_years: m.age_years,
            sex: m.sex.map(|s| {
                match s {
                    Sex::Female => "female",
                    Sex::Male => "male",
                    Sex::Other => "other",
                }
                .to_owned()
            }),
            anatomical_site: m.anatomical_site.clone(),
            fitzpatrick_type: m.fitzpatrick_type,
            lesion_id: m.lesion_id.clone(),
        },
        created_at_ms: case.created_at_ms,
        updated_at_ms: case.updated_at_ms,
        thumbnail_jpeg: case.thumbnail_jpeg.clone(),
        original_jpeg: original,
        source: None,
        device_id: None,
    }
}

/// Why a pulled case was not stored. Never holds the case's id or data.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// The store form of a pulled case, or why it may not be stored. The
/// original photograph, if the service sent one, is dropped: the device
/// keeps originals of its own captures only.
pub fn from_wire(wire: WireCase, store: &StoreIdentity) -> Result<Case, Refused> {
    let refuse = |why: String| Err(Refused(why));
    let source = match wire.source {
        Some(WireSource::Fleet) => CaseSource::Fleet,
        Some(WireSource::Reference) => CaseSource::Reference,
        None => return refuse("no source (fleet or reference)".into()),
    };
    if wire.model_id != store.model_id {
        return refuse(format!(
            "embedded by {:?}, not this device's encoder {:?}",
            wire.model_id, store.model_id
        ));
    }
    if wire.embedding.len() != store.embedding_dim {
        return refuse(format!(
            "embedding of {} dimensions; the encoder's are {}",
            wire.embedding.len(),
            store.embedding_dim
        ));
    }
    if let Some(i) = wire.embedding.iter().position(|x| !x.is_finite()) {
        return refuse(format!("embedding component {i} is not finite"));
    }
    if wire.thumbnail_jpeg.len() > MAX_THUMBNAIL_BYTES {
        return refuse(format!(
            "thumbnail of {} bytes; at most {MAX_THUMBNAIL_BYTES}",
            wire.thumbnail_jpeg.len()
        ));
    }
    if wire.revision == 0 {
        return refuse("revision 0".into());
    }
    let device_id = match (source, wire.device_id) {
        (CaseSource::Fleet, None) => return refuse("a fleet case without its device".into()),
        (_, Some(d)) if d.is_empty() || d.len() > MAX_DEVICE_ID_BYTES => {
            return refuse("device id of a bad length".into())
        }
        (_, device) => device,
    };
    let id = CaseId::new(wire.id).map_err(|e| Refused(format!("id: {e}")))?;
    let diagnosis = Diagnosis::new(wire.diagnosis.code, wire.diagnosis.name)
        .map_err(|e| Refused(format!("diagnosis: {e}")))?;
    let m = wire.metadata;
    let sex = match m.sex.as_deref() {
        None => None,
        Some("female") => Some(Sex::Female),
        Some("male") => Some(Sex::Male),
        Some("other") => Some(Sex::Other),
        // Optional context: a value this build does not know is dropped
        // rather than costing the case.
        Some(_) => None,
    };
    let case = Case {
        id,
        embedding: wire.embedding,
        diagnosis,
        source,
        metadata: CaseMetadata {
            age_years: m.age_years,
            sex,
            anatomical_site: m.anatomical_site,
            fitzpatrick_type: m.fitzpatrick_type,
            note: None,
            lesion_id: m.lesion_id,
        },
        thumbnail_jpeg: wire.thumbnail_jpeg,
        model_id: wire.model_id,
        created_at_ms: wire.created_at_ms,
        updated_at_ms: wire.updated_at_ms,
        label_confirmed: wire.label_confirmed,
        device_id,
        revision: wire.revision,
    };
    // Everything else the store checks (id, diagnosis, site and lesion
    // lengths, Fitzpatrick range, device id characters).
    case.validate(&store.model_id, store.embedding_dim)
        .map_err(|e| Refused(e.to_string()))?;
    Ok(case)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> StoreIdentity {
        StoreIdentity {
            model_id: "enc-v1".into(),
            embedding_dim: 3,
        }
    }

    fn captured() -> Case {
        Case {
            id: CaseId::generate(),
            embedding: vec![0.6, 0.8, 0.0],
            diagnosis: Diagnosis::from_code("mel").unwrap(),
            source: CaseSource::Captured,
            metadata: CaseMetadata {
                age_years: Some(61),
                sex: Some(Sex::Female),
                anatomical_site: Some("back".into()),
                fitzpatrick_type: Some(2),
                note: Some("Mrs Doe, call back Tuesday".into()),
                lesion_id: Some("lesion-7".into()),
            },
            thumbnail_jpeg: vec![0xff, 0xd8, 1, 2],
            model_id: "enc-v1".into(),
            created_at_ms: 10,
            updated_at_ms: 20,
            label_confirmed: true,
            device_id: Some("0193a3c0-0000-7000-8000-0000000000d1".into()),
            revision: 2,
        }
    }

    fn pulled() -> WireCase {
        pulled_from(&captured())
    }

    fn pulled_from(case: &Case) -> WireCase {
        let mut wire = to_wire(case, None);
        wire.source = Some(WireSource::Fleet);
        wire.device_id = Some("0193a3c0-0000-7000-8000-0000000000d2".into());
        wire
    }

    #[test]
    fn the_note_never_leaves_and_the_original_only_when_given() {
        let wire = to_wire(&captured(), None);
        let json = serde_json::to_string(&wire).unwrap();
        assert!(!json.contains("Doe") && !json.contains("Tuesday"), "{json}");
        assert!(!json.contains("original_jpeg"), "{json}");
        assert!(json.contains("\"sex\":\"female\""), "{json}");
        let with = to_wire(&captured(), Some(vec![0xff, 0xd8, 9]));
        assert_eq!(with.original_jpeg, Some(vec![0xff, 0xd8, 9]));
    }

    #[test]
    fn a_good_pulled_case_round_trips_as_fleet() {
        let mut expected = captured();
        let case = from_wire(pulled_from(&expected), &store()).unwrap();
        expected.source = CaseSource::Fleet;
        expected.metadata.note = None;
        expected.device_id = Some("0193a3c0-0000-7000-8000-0000000000d2".into());
        assert_eq!(case, expected);
        let mut reference = pulled();
        reference.source = Some(WireSource::Reference);
        reference.device_id = None;
        assert_eq!(
            from_wire(reference, &store()).unwrap().source,
            CaseSource::Reference
        );
    }

    #[test]
    fn a_bad_pulled_case_is_refused_with_a_reason() {
        type Breaker = fn(&mut WireCase);
        let breakers: [(Breaker, &str); 8] = [
            (|w| w.source = None, "source"),
            (|w| w.model_id = "enc-v2".into(), "encoder"),
            (|w| w.embedding.push(0.0), "dimensions"),
            (|w| w.embedding[1] = f32::NAN, "finite"),
            (
                |w| w.thumbnail_jpeg = vec![0; MAX_THUMBNAIL_BYTES + 1],
                "thumbnail",
            ),
            (|w| w.id = String::new(), "id"),
            (|w| w.device_id = None, "device"),
            (|w| w.metadata.fitzpatrick_type = Some(9), "Fitzpatrick"),
        ];
        for (breaker, word) in breakers {
            let mut wire = pulled();
            breaker(&mut wire);
            let err = from_wire(wire, &store()).unwrap_err();
            assert!(err.0.contains(word), "{word}: {err}");
        }
    }
}
