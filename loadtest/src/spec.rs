//! Plain values the other modules share: a member's role, a group of rooms, a source-address
//! range, a shard of a distributed run. Parsing and printing only; this module imports nothing
//! from the crate, so every other module may use it without a cycle.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// What a member is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Publishes at the host rate.
    Host,
    /// Watches, and chats at the viewer rate.
    Viewer,
}

impl Role {
    /// The wire spelling, for `?role=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Viewer => "viewer",
        }
    }
}

/// A set of identical rooms.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomGroup {
    /// How many rooms.
    pub rooms: usize,
    /// Hosts in each room.
    pub hosts: usize,
    /// Viewers in each room.
    pub viewers: usize,
    /// Per-host rate of this group; `None` takes --host-rate.
    pub host_rate: Option<f64>,
    /// Per-viewer rate of this group; `None` takes --viewer-rate.
    pub viewer_rate: Option<f64>,
}

impl FromStr for RoomGroup {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("`{s}` is not a room group: write ROOMSxHOSTSxVIEWERS[@HOST_RATE[/VIEWER_RATE]], e.g. 1x2x1000 or 100x1x5@5/0.2")
        };
        let (counts, rates) = match s.split_once('@') {
            Some((c, r)) => (c, Some(r)),
            None => (s, None),
        };
        let n: Vec<usize> = counts
            .split(['x', 'X'])
            .map(|p| p.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad())?;
        let [rooms, hosts, viewers] = n[..] else {
            return Err(bad());
        };
        if rooms == 0 || hosts + viewers == 0 {
            return Err(format!(
                "`{s}`: a group needs at least one room and one member"
            ));
        }
        let rate = |r: &str| -> Result<f64, String> {
            let v: f64 = r.trim().parse().map_err(|_| bad())?;
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(bad())
            }
        };
        let (host_rate, viewer_rate) = match rates {
            None => (None, None),
            Some(r) => match r.split_once('/') {
                Some((h, v)) => (Some(rate(h)?), Some(rate(v)?)),
                None => (Some(rate(r)?), None),
            },
        };
        Ok(RoomGroup {
            rooms,
            hosts,
            viewers,
            host_rate,
            viewer_rate,
        })
    }
}

impl fmt::Display for RoomGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}x{}", self.rooms, self.hosts, self.viewers)?;
        match (self.host_rate, self.viewer_rate) {
            (Some(h), Some(v)) => write!(f, "@{h}/{v}"),
            (Some(h), None) => write!(f, "@{h}"),
            _ => Ok(()),
        }
    }
}

/// An inclusive range of IPv4 source addresses (one address is a range of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrRange {
    /// First address.
    pub first: Ipv4Addr,
    /// Last address, not below `first`.
    pub last: Ipv4Addr,
}

impl AddrRange {
    /// Every address of the range, in order.
    pub fn addrs(&self) -> impl Iterator<Item = Ipv4Addr> {
        (u32::from(self.first)..=u32::from(self.last)).map(Ipv4Addr::from)
    }
}

impl FromStr for AddrRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |a: &str| -> Result<Ipv4Addr, String> {
            a.trim()
                .parse()
                .map_err(|_| format!("`{a}` is not an IPv4 address"))
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => (parse(s)?, parse(s)?),
        };
        if u32::from(last) < u32::from(first) {
            return Err(format!("`{s}`: the range ends before it starts"));
        }
        if u32::from(last) - u32::from(first) >= 4096 {
            return Err(format!("`{s}`: at most 4096 addresses"));
        }
        Ok(AddrRange { first, last })
    }
}

/// This generator's share of a distributed run: `index` of `total` (`--shard 0/2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shard {
    /// From 0.
    pub index: usize,
    /// At least 1.
    pub total: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Self { index: 0, total: 1 }
    }
}

impl Shard {
    /// Whether the `n`-th seat of a list (hosts or viewers, in plan order) is this shard's.
    pub fn owns(&self, n: usize) -> bool {
        n % self.total == self.index
    }

    /// Whether the run is split at all.
    pub fn is_split(&self) -> bool {
        self.total > 1
    }
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("`{s}` is not a shard: write INDEX/TOTAL with INDEX < TOTAL, e.g. 0/4");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let total: usize = n.trim().parse().map_err(|_| bad())?;
        if total == 0 || index >= total || total > 10_000 {
            return Err(bad());
        }
        Ok(Shard { index, total })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_groups() {
        let g: RoomGroup = "1x2x1000".parse().unwrap();
        assert_eq!((g.rooms, g.hosts, g.viewers), (1, 2, 1000));
        assert_eq!((g.host_rate, g.viewer_rate), (None, None));
        let g: RoomGroup = "100x1x5@5/0.2".parse().unwrap();
        assert_eq!((g.host_rate, g.viewer_rate), (Some(5.0), Some(0.2)));
        assert_eq!(g.to_string(), "100x1x5@5/0.2");
        let g: RoomGroup = "3x0x7@4".parse().unwrap();
        assert_eq!((g.host_rate, g.viewer_rate), (Some(4.0), None));
        for bad in [
            "",
            "1x2",
            "0x1x1",
            "1x0x0",
            "ax1x1",
            "1x1x1@-1",
            "1x1x1@x/1",
        ] {
            assert!(bad.parse::<RoomGroup>().is_err(), "{bad}");
        }
    }

    #[test]
    fn address_ranges() {
        let r: AddrRange = "127.0.0.2-127.0.0.4".parse().unwrap();
        let all: Vec<String> = r.addrs().map(|a| a.to_string()).collect();
        assert_eq!(all, ["127.0.0.2", "127.0.0.3", "127.0.0.4"]);
        assert_eq!("127.0.0.9".parse::<AddrRange>().unwrap().addrs().count(), 1);
        assert_eq!("10.0.0.1".parse::<AddrRange>().unwrap().addrs().count(), 1);
        assert!("127.0.0.4-127.0.0.2".parse::<AddrRange>().is_err());
        assert!("nope".parse::<AddrRange>().is_err());
    }

    #[test]
    fn shards() {
        let s: Shard = "1/3".parse().unwrap();
        assert_eq!((s.index, s.total), (1, 3));
        assert_eq!(s.to_string(), "1/3");
        let owned: Vec<usize> = (0..7).filter(|n| s.owns(*n)).collect();
        assert_eq!(owned, [1, 4]);
        for bad in ["3/3", "0/0", "1", "a/2", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        // Disjoint and complete: every seat belongs to exactly one shard.
        for n in 0..100 {
            let owners = (0..4)
                .filter(|i| {
                    Shard {
                        index: *i,
                        total: 4,
                    }
                    .owns(n)
                })
                .count();
            assert_eq!(owners, 1);
        }
    }
}
