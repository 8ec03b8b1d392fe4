//! Sharing a node-wide rate between active clients: weighted max-min fairness by water-filling.
//!
//! Each active client has a weight and a demand (what it would use: its class rate, or less when
//! it was seen using less). The total is poured into the clients in order of demand per unit of
//! weight: a client whose demand is below its weighted share gets its demand, and what it leaves
//! is shared by the others in proportion to their weights. No client gets more than its demand;
//! the allocations sum to at most the total.
//!
//! Pure and allocation-light; never panics (zero weights count as 1, sums saturate).

/// One active client as the allocation sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub weight: u32,
    /// Bytes per second it would use; `u64::MAX` = as much as it can get.
    pub demand: u64,
}

/// Allocate `total` bytes/s between `claims` (same order as given).
pub fn water_fill(total: u64, claims: &[Claim]) -> Vec<u64> {
    let mut order: Vec<usize> = (0..claims.len()).collect();
    let w = |c: &Claim| u128::from(c.weight.max(1));
    // Ascending demand per unit of weight: the ones that need least are settled first.
    order.sort_by(|&a, &b| {
        let (ca, cb) = (&claims[a], &claims[b]);
        (u128::from(ca.demand) * w(cb)).cmp(&(u128::from(cb.demand) * w(ca)))
    });
    let mut alloc = vec![0u64; claims.len()];
    let mut left = u128::from(total);
    let mut weight_left: u128 = claims.iter().map(w).sum();
    for i in order {
        if weight_left == 0 {
            break;
        }
        let c = &claims[i];
        let share = left * w(c) / weight_left;
        let got = share.min(u128::from(c.demand));
        alloc[i] = u64::try_from(got).unwrap_or(u64::MAX);
        left -= got;
        weight_left -= w(c);
    }
    alloc
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn c(weight: u32, demand: u64) -> Claim {
        Claim { weight, demand }
    }

    #[test]
    fn equal_clients_split_evenly() {
        assert_eq!(
            water_fill(300, &[c(1, 1000), c(1, 1000), c(1, 1000)]),
            vec![100, 100, 100]
        );
    }

    #[test]
    fn weights_share_proportionally() {
        assert_eq!(
            water_fill(400, &[c(1, u64::MAX), c(3, u64::MAX)]),
            vec![100, 300]
        );
    }

    #[test]
    fn a_small_client_leaves_the_rest_to_the_others() {
        assert_eq!(
            water_fill(300, &[c(1, 40), c(1, 1000), c(1, 1000)]),
            vec![40, 130, 130]
        );
        // Everyone below their share: everyone gets their demand.
        assert_eq!(water_fill(300, &[c(1, 40), c(1, 50)]), vec![40, 50]);
    }

    #[test]
    fn degenerate_inputs() {
        assert!(water_fill(100, &[]).is_empty());
        assert_eq!(water_fill(0, &[c(1, 10)]), vec![0]);
        assert_eq!(
            water_fill(100, &[c(0, u64::MAX), c(0, u64::MAX)]),
            vec![50, 50]
        );
        assert_eq!(
            water_fill(u64::MAX, &[c(u32::MAX, u64::MAX)]),
            vec![u64::MAX]
        );
    }

    proptest! {
        #[test]
        fn allocations_are_max_min_fair(
            total in 0u64..1_000_000_000,
            claims in proptest::collection::vec((1u32..10, 0u64..2_000_000_000), 0..20),
        ) {
            let claims: Vec<Claim> = claims.into_iter().map(|(w, d)| c(w, d)).collect();
            let a = water_fill(total, &claims);
            let sum: u128 = a.iter().map(|&x| u128::from(x)).sum();
            prop_assert!(sum <= u128::from(total));
            for (x, cl) in a.iter().zip(&claims) {
                prop_assert!(*x <= cl.demand);
            }
            // Either all demands are met, or the total is (nearly) used up.
            let all_met = a.iter().zip(&claims).all(|(x, cl)| *x == cl.demand);
            prop_assert!(all_met || u128::from(total) - sum <= claims.len() as u128);
            // A client that did not get its demand got at least its weighted share of what was
            // given to unsatisfied clients (no unsatisfied client is starved relative to another).
            for (i, (xi, ci)) in a.iter().zip(&claims).enumerate() {
                if *xi < ci.demand {
                    for (j, (xj, cj)) in a.iter().zip(&claims).enumerate() {
                        if i != j {
                            // x_i / w_i >= x_j / w_j - 1 (rounding)
                            prop_assert!(u128::from(*xi + 1) * u128::from(cj.weight) + u128::from(cj.weight) * u128::from(ci.weight)
                                >= u128::from(*xj) * u128::from(ci.weight));
                        }
                    }
                }
            }
        }
    }
}
