//! The sled trees a store is made of, named in one place.

use super::error::{storage, StoreError};

/// One sled tree of the store. Its name is part of the on-disk format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tree {
    /// The header: format version, model id, dimension, write generation.
    Meta,
    /// Case id -> case record (`codec::encode_case`).
    Cases,
    /// Case id -> embedding row with its search tags.
    Embeddings,
    /// Write generation -> ids that write touched (see `cache`).
    Changes,
    /// Case id -> adapter embedding (see `adapter_space`).
    AdapterEmbeddings,
    /// Captured case id -> the revision not yet uploaded to the fleet service.
    Outbox,
    /// Case id -> the original photograph (JPEG) the case was made from.
    Originals,
}

impl Tree {
    pub(crate) const ALL: [Tree; 7] = [
        Tree::Meta,
        Tree::Cases,
        Tree::Embeddings,
        Tree::Changes,
        Tree::AdapterEmbeddings,
        Tree::Outbox,
        Tree::Originals,
    ];

    pub(crate) const fn name(self) -> &'static str {
        match self {
            Tree::Meta => "meta",
            Tree::Cases => "cases",
            Tree::Embeddings => "embeddings",
            Tree::Changes => "changes",
            Tree::AdapterEmbeddings => "adapter_embeddings",
            Tree::Outbox => "outbox",
            Tree::Originals => "originals",
        }
    }

    /// The tree's byte in the store's journal (`journal`): on-disk format too.
    pub(crate) const fn code(self) -> u8 {
        match self {
            Tree::Meta => 1,
            Tree::Cases => 2,
            Tree::Embeddings => 3,
            Tree::Changes => 4,
            Tree::AdapterEmbeddings => 5,
            Tree::Outbox => 6,
            Tree::Originals => 7,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|tree| tree.code() == code)
    }

    fn open(self, db: &sled::Db) -> Result<sled::Tree, StoreError> {
        db.open_tree(self.name()).map_err(storage(match self {
            Tree::Meta => "opening the meta tree",
            Tree::Cases => "opening the cases tree",
            Tree::Embeddings => "opening the embeddings tree",
            Tree::Changes => "opening the changes tree",
            Tree::AdapterEmbeddings => "opening the adapter embeddings tree",
            Tree::Outbox => "opening the outbox tree",
            Tree::Originals => "opening the originals tree",
        }))
    }
}

/// Every tree of an open store.
pub(crate) struct Trees {
    pub(crate) meta: sled::Tree,
    pub(crate) cases: sled::Tree,
    pub(crate) embeddings: sled::Tree,
    pub(crate) changes: sled::Tree,
    pub(crate) adapter_rows: sled::Tree,
    pub(crate) outbox: sled::Tree,
    pub(crate) originals: sled::Tree,
}

impl Trees {
    pub(crate) fn get(&self, tree: Tree) -> &sled::Tree {
        match tree {
            Tree::Meta => &self.meta,
            Tree::Cases => &self.cases,
            Tree::Embeddings => &self.embeddings,
            Tree::Changes => &self.changes,
            Tree::AdapterEmbeddings => &self.adapter_rows,
            Tree::Outbox => &self.outbox,
            Tree::Originals => &self.originals,
        }
    }

    pub(crate) fn open(db: &sled::Db) -> Result<Self, StoreError> {
        Ok(Self {
            meta: Tree::Meta.open(db)?,
            cases: Tree::Cases.open(db)?,
            embeddings: Tree::Embeddings.open(db)?,
            changes: Tree::Changes.open(db)?,
            adapter_rows: Tree::AdapterEmbeddings.open(db)?,
            outbox: Tree::Outbox.open(db)?,
            originals: Tree::Originals.open(db)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_codes_round_trip_and_are_distinct() {
        let all = Tree::ALL;
        for tree in all {
            assert_eq!(Tree::from_code(tree.code()), Some(tree));
        }
        let codes: std::collections::HashSet<u8> = all.iter().map(|t| t.code()).collect();
        assert_eq!(codes.len(), all.len());
        assert_eq!(Tree::from_code(0), None);
    }

    /// The names are the on-disk format: a rename would orphan every store.
    #[test]
    fn tree_names_are_the_format() {
        let names = Tree::ALL.map(Tree::name);
        assert_eq!(
            names,
            [
                "meta",
                "cases",
                "embeddings",
                "changes",
                "adapter_embeddings",
                "outbox",
                "originals"
            ]
        );
    }
}
