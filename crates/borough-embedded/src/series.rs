//! The writer's map from (tenant, entity, attribute, datasetId) to a history
//! series number, kept in memory so that recording an instance needs no
//! B-tree lookup.
//!
//! A city has millions of series but few distinct tenants, attribute names
//! and datasetIds: those are interned once, and each entity keeps a short
//! list of (name, datasetId, series). A flat map keyed by the four strings
//! took about five times the memory for the same series.

use foldhash::{HashMap, HashMapExt};

/// One series of an entity: interned attribute name and datasetId.
#[derive(Clone, Copy)]
struct Slot {
    name: u32,
    dataset: u32,
    series: u64,
}

#[derive(Default)]
pub struct SeriesIndex {
    /// Interned tenant names, attribute names and datasetIds.
    names: HashMap<Box<str>, u32>,
    /// Tenant → entity id → its series.
    tenants: HashMap<u32, HashMap<Box<str>, Vec<Slot>>>,
    len: usize,
}

impl SeriesIndex {
    pub fn new() -> Self {
        Self {
            names: HashMap::new(),
            tenants: HashMap::new(),
            len: 0,
        }
    }

    /// The number of series.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    fn name(&self, s: &str) -> Option<u32> {
        self.names.get(s).copied()
    }

    fn intern(&mut self, s: &str) -> u32 {
        if let Some(n) = self.names.get(s) {
            return *n;
        }
        let n = self.names.len() as u32;
        self.names.insert(s.into(), n);
        n
    }

    pub fn get(&self, tenant: &str, entity: &str, name: &str, dataset: &str) -> Option<u64> {
        let slots = self.tenants.get(&self.name(tenant)?)?.get(entity)?;
        let (name, dataset) = (self.name(name)?, self.name(dataset)?);
        slots
            .iter()
            .find(|s| s.name == name && s.dataset == dataset)
            .map(|s| s.series)
    }

    /// Whether the entity has at least one series.
    pub fn has_entity(&self, tenant: &str, entity: &str) -> bool {
        self.name(tenant)
            .and_then(|t| self.tenants.get(&t))
            .is_some_and(|m| m.contains_key(entity))
    }

    pub fn insert(&mut self, tenant: &str, entity: &str, name: &str, dataset: &str, series: u64) {
        let slot = Slot {
            name: self.intern(name),
            dataset: self.intern(dataset),
            series,
        };
        let tenant = self.intern(tenant);
        let entities = self.tenants.entry(tenant).or_default();
        let slots = match entities.get_mut(entity) {
            Some(slots) => slots,
            None => entities.entry(entity.into()).or_default(),
        };
        match slots
            .iter_mut()
            .find(|s| s.name == slot.name && s.dataset == slot.dataset)
        {
            Some(old) => old.series = series,
            None => {
                slots.push(slot);
                slots.shrink_to_fit();
                self.len += 1;
            }
        }
    }

    pub fn remove(&mut self, tenant: &str, entity: &str, name: &str, dataset: &str) {
        let (Some(t), Some(name), Some(dataset)) =
            (self.name(tenant), self.name(name), self.name(dataset))
        else {
            return;
        };
        let Some(entities) = self.tenants.get_mut(&t) else {
            return;
        };
        let Some(slots) = entities.get_mut(entity) else {
            return;
        };
        let before = slots.len();
        slots.retain(|s| !(s.name == name && s.dataset == dataset));
        self.len -= before - slots.len();
        if slots.is_empty() {
            entities.remove(entity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_what_was_inserted_and_forgets_what_was_removed() {
        let mut ix = SeriesIndex::new();
        ix.insert("t", "urn:a", "speed", "", 1);
        ix.insert("t", "urn:a", "speed", "urn:d:1", 2);
        ix.insert("u", "urn:a", "speed", "", 3);
        assert_eq!(ix.get("t", "urn:a", "speed", ""), Some(1));
        assert_eq!(ix.get("t", "urn:a", "speed", "urn:d:1"), Some(2));
        assert_eq!(ix.get("u", "urn:a", "speed", ""), Some(3));
        assert_eq!(ix.get("t", "urn:b", "speed", ""), None);
        assert_eq!(ix.get("t", "urn:a", "flow", ""), None);
        assert_eq!(ix.len(), 3);
        ix.remove("t", "urn:a", "speed", "");
        assert_eq!(ix.get("t", "urn:a", "speed", ""), None);
        assert!(ix.has_entity("t", "urn:a"));
        ix.remove("t", "urn:a", "speed", "urn:d:1");
        assert!(!ix.has_entity("t", "urn:a"));
        assert!(ix.has_entity("u", "urn:a"));
        assert_eq!(ix.len(), 1);
    }
}
