//! Leader election on a real 3-node cluster (etcd's election service
//! shape): candidates lead in campaign order, Leader and Observe report the
//! leader and its proclaimed value, only the leader may proclaim, and
//! resigning or the leader's session ending hands leadership to the next
//! candidate with a higher fencing token.

mod common;

use std::time::Duration;

use common::{TestCluster, channel};
use shopkv::proto;
use shopkv::proto::election_client::ElectionClient;
use shopkv::proto::session_client::SessionClient;
use tonic::Code;
use tonic::transport::Channel;

async fn session(s: &mut SessionClient<Channel>) -> u64 {
    s.create(proto::CreateSessionRequest { ttl_ms: 10_000 })
        .await
        .expect("session")
        .into_inner()
        .session_id
}

fn campaign(session: u64, value: &str) -> proto::CampaignRequest {
    proto::CampaignRequest {
        name: "primary".into(),
        session_id: session,
        value: value.as_bytes().to_vec(),
        wait_timeout_ms: 20_000,
    }
}

async fn next_leader(s: &mut tonic::Streaming<proto::LeaderResponse>) -> (u64, u64, String) {
    let r = tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("an observation within 10 s")
        .expect("stream ok")
        .expect("stream open");
    let k = r.leader.expect("leader key");
    (
        k.session_id,
        k.fencing_token,
        String::from_utf8_lossy(&r.value).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidates_lead_in_turn_and_observers_see_every_leader() {
    let c = TestCluster::start_initialised(3, 1, &[]).await;
    let ch1 = channel(&c.node(1).client).await.expect("connect");
    let ch2 = channel(&c.node(2).client).await.expect("connect");
    let mut s = SessionClient::new(ch1.clone());
    let mut e1 = ElectionClient::new(ch1);
    let mut e2 = ElectionClient::new(ch2);
    let (a, b, cc) = (
        session(&mut s).await,
        session(&mut s).await,
        session(&mut s).await,
    );

    let none = e2
        .leader(proto::LeaderRequest {
            name: "primary".into(),
        })
        .await
        .expect_err("nobody leads yet");
    assert_eq!(none.code(), Code::NotFound);

    let ka = e1
        .campaign(campaign(a, "node-a"))
        .await
        .expect("A leads at once")
        .into_inner()
        .leader
        .expect("key");
    let mut observe = e2
        .observe(proto::LeaderRequest {
            name: "primary".into(),
        })
        .await
        .expect("observe")
        .into_inner();
    assert_eq!(
        next_leader(&mut observe).await,
        (a, ka.fencing_token, "node-a".into())
    );

    // B and C wait behind A.
    let mut eb = e1.clone();
    let b_wait = tokio::spawn(async move { eb.campaign(campaign(b, "node-b")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ec = e1.clone();
    let c_wait = tokio::spawn(async move { ec.campaign(campaign(cc, "node-c")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b_wait.is_finished() && !c_wait.is_finished());

    // Only the leader proclaims.
    e2.proclaim(proto::ProclaimRequest {
        leader: Some(ka.clone()),
        value: b"node-a:v2".to_vec(),
    })
    .await
    .expect("A proclaims");
    assert_eq!(
        next_leader(&mut observe).await,
        (a, ka.fencing_token, "node-a:v2".into())
    );
    let got = e2
        .leader(proto::LeaderRequest {
            name: "primary".into(),
        })
        .await
        .expect("leader")
        .into_inner();
    assert_eq!(got.value, b"node-a:v2");
    let not = e2
        .proclaim(proto::ProclaimRequest {
            leader: Some(proto::LeaderKey {
                name: "primary".into(),
                session_id: b,
                fencing_token: ka.fencing_token,
            }),
            value: b"usurper".to_vec(),
        })
        .await
        .expect_err("B does not lead");
    assert_eq!(not.code(), Code::FailedPrecondition);

    // A resigns: B leads with a higher token.
    e2.resign(proto::ResignRequest {
        leader: Some(ka.clone()),
    })
    .await
    .expect("resign");
    let kb = b_wait
        .await
        .expect("task")
        .expect("B leads")
        .into_inner()
        .leader
        .expect("key");
    assert!(kb.fencing_token > ka.fencing_token);
    assert_eq!(
        next_leader(&mut observe).await,
        (b, kb.fencing_token, "node-b".into())
    );
    // Resigning a leadership that is over changes nothing.
    e2.resign(proto::ResignRequest { leader: Some(ka) })
        .await
        .expect("stale resign is a no-op");
    assert!(!c_wait.is_finished());

    // B's session ends: C leads.
    s.close(proto::CloseSessionRequest { session_id: b })
        .await
        .expect("close B");
    let kc = c_wait
        .await
        .expect("task")
        .expect("C leads")
        .into_inner()
        .leader
        .expect("key");
    assert!(kc.fencing_token > kb.fencing_token);
    assert_eq!(
        next_leader(&mut observe).await,
        (cc, kc.fencing_token, "node-c".into())
    );

    let bad = e2
        .campaign(proto::CampaignRequest {
            name: String::new(),
            session_id: a,
            value: Vec::new(),
            wait_timeout_ms: 0,
        })
        .await
        .expect_err("empty name");
    assert_eq!(bad.code(), Code::InvalidArgument);
}
