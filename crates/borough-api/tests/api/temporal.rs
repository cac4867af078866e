//! The temporal API: history recorded by ordinary writes, its representations,
//! aggregations checked by hand, temporal writes, bulk import, paging, retention
//! and bad input.

use crate::common::TestApp;
use axum::http::{Method, StatusCode};
use serde_json::json;

const T: &str = "/ngsi-ld/v1/temporal/entities";

async fn import(app: &TestApp, csv: String) -> crate::common::Resp {
    app.send(
        Method::POST,
        "/api/v1/history/import",
        &[("content-type", "text/csv")],
        Some(csv),
    )
    .await
}

fn at(minutes: i64) -> String {
    // 2025-01-01T00:00:00Z plus minutes, as epoch milliseconds.
    (1_735_689_600_000i64 + minutes * 60_000).to_string()
}

#[tokio::test]
async fn ordinary_writes_record_history() {
    let app = TestApp::new();
    let r = app
        .json(
            Method::POST,
            "/ngsi-ld/v1/entities",
            &json!({
                "id": "urn:ngsi-ld:Sensor:1", "type": "Sensor",
                "temperature": {"type": "Property", "value": 20.5, "observedAt": "2025-01-01T00:00:00Z", "unitCode": "CEL"},
                "status": {"type": "Property", "value": "ok"}
            }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    for (i, v) in [21.0, 22.5, 19.0].iter().enumerate() {
        let r = app
            .json(
                Method::PATCH,
                "/ngsi-ld/v1/entities/urn:ngsi-ld:Sensor:1/attrs",
                &json!({"temperature": {"type": "Property", "value": v, "observedAt": format!("2025-01-01T0{}:00:00Z", i + 1), "unitCode": "CEL"}}),
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
    }
    let r = app.get(&format!("{T}/urn:ngsi-ld:Sensor:1")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let temps = r.body["temperature"].as_array().unwrap();
    let values: Vec<f64> = temps.iter().map(|i| i["value"].as_f64().unwrap()).collect();
    assert_eq!(values, vec![20.5, 21.0, 22.5, 19.0]);
    assert_eq!(temps[1]["observedAt"], "2025-01-01T01:00:00Z");
    assert_eq!(temps[1]["unitCode"], "CEL");
    let ids: std::collections::HashSet<&str> = temps
        .iter()
        .map(|i| i["instanceId"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 4, "every instance has its own instanceId");
    // status was written once: one instance, though the entity changed four times.
    assert_eq!(r.body["status"].as_array().unwrap().len(), 1);

    let r = app
        .get(&format!(
            "{T}/urn:ngsi-ld:Sensor:1?attrs=temperature&options=temporalValues&lastN=2"
        ))
        .await;
    assert_eq!(
        r.body,
        json!({"id": "urn:ngsi-ld:Sensor:1", "type": "Sensor", "temperature": {"type": "Property",
            "values": [[22.5, "2025-01-01T02:00:00Z"], [19.0, "2025-01-01T03:00:00Z"]]}})
    );
    let r = app
        .get(&format!(
            "{T}/urn:ngsi-ld:Sensor:1?attrs=temperature&options=temporalValues&timerel=between&timeAt=2025-01-01T01:00:00Z&endTimeAt=2025-01-01T03:00:00Z"
        ))
        .await;
    assert_eq!(
        r.body["temperature"]["values"],
        json!([
            [21.0, "2025-01-01T01:00:00Z"],
            [22.5, "2025-01-01T02:00:00Z"]
        ])
    );
    let r = app
        .get(&format!("{T}/urn:ngsi-ld:Sensor:1?timerel=before&timeAt=2025-01-01T01:00:00Z&attrs=temperature&options=temporalValues"))
        .await;
    assert_eq!(
        r.body["temperature"]["values"],
        json!([[20.5, "2025-01-01T00:00:00Z"]])
    );
    // Deleting the entity keeps its history; the temporal API deletes history.
    assert_eq!(
        app.delete("/ngsi-ld/v1/entities/urn:ngsi-ld:Sensor:1")
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.get(&format!("{T}/urn:ngsi-ld:Sensor:1")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        app.get(&format!("{T}/urn:ngsi-ld:Sensor:2")).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn aggregations_match_hand_computed_values() {
    let app = TestApp::new();
    // Two days of 6-hourly readings: day 1 = 1,2,3,4; day 2 = 10,10,20,40.
    let values = [1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 20.0, 40.0];
    let csv: String = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            format!(
                "urn:ngsi-ld:Meter:1,ElectricityMeter,energy,{},{v}\n",
                at(i as i64 * 360)
            )
        })
        .collect();
    let r = import(&app, csv).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, json!({"points": 8, "series": 1, "entities": 1}));
    let r = app
        .get(&format!(
            "{T}/urn:ngsi-ld:Meter:1?options=aggregatedValues&aggrMethods=totalCount,distinctCount,sum,avg,min,max,stddev,sumsq&aggrPeriodDuration=P1D&timerel=between&timeAt=2025-01-01T00:00:00Z&endTimeAt=2025-01-03T00:00:00Z"
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let e = &r.body["energy"];
    let day1 = ("2025-01-01T00:00:00Z", "2025-01-02T00:00:00Z");
    let day2 = ("2025-01-02T00:00:00Z", "2025-01-03T00:00:00Z");
    assert_eq!(
        e["totalCount"],
        json!([[4, day1.0, day1.1], [4, day2.0, day2.1]])
    );
    assert_eq!(
        e["distinctCount"],
        json!([[4, day1.0, day1.1], [3, day2.0, day2.1]])
    );
    assert_eq!(
        e["sum"],
        json!([[10.0, day1.0, day1.1], [80.0, day2.0, day2.1]])
    );
    assert_eq!(
        e["avg"],
        json!([[2.5, day1.0, day1.1], [20.0, day2.0, day2.1]])
    );
    assert_eq!(
        e["min"],
        json!([[1.0, day1.0, day1.1], [10.0, day2.0, day2.1]])
    );
    assert_eq!(
        e["max"],
        json!([[4.0, day1.0, day1.1], [40.0, day2.0, day2.1]])
    );
    assert_eq!(
        e["sumsq"],
        json!([[30.0, day1.0, day1.1], [2200.0, day2.0, day2.1]])
    );
    // Sample standard deviations: sqrt(5/3) and sqrt(600/3 ... ) = sqrt(200).
    let sd = e["stddev"].as_array().unwrap();
    assert!((sd[0][0].as_f64().unwrap() - (5.0f64 / 3.0).sqrt()).abs() < 1e-9);
    assert!((sd[1][0].as_f64().unwrap() - 200.0f64.sqrt()).abs() < 1e-9);
    // Without a period: one bucket over the whole window.
    let r = app
        .get(&format!(
            "{T}/urn:ngsi-ld:Meter:1?options=aggregatedValues&aggrMethods=sum&timerel=after&timeAt=2025-01-01T12:00:00Z"
        ))
        .await;
    assert_eq!(r.body["energy"]["sum"][0][0], json!(87.0));
    assert_eq!(r.body["energy"]["sum"][0][1], "2025-01-01T12:00:00Z");
}

#[tokio::test]
async fn temporal_queries_select_page_and_count() {
    let app = TestApp::new();
    let mut csv = String::new();
    for e in 0..5 {
        for i in 0..3 {
            csv.push_str(&format!(
                "urn:ngsi-ld:Spot:{e},ParkingSpot,occupancy,{},{}\n",
                at(i * 15),
                e * 10 + i
            ));
        }
    }
    csv.push_str(&format!(
        "urn:ngsi-ld:Light:1,Streetlight,power,{},1\n",
        at(0)
    ));
    assert_eq!(import(&app, csv).await.status, StatusCode::OK);
    let r = app
        .get(&format!(
            "{T}?type=ParkingSpot&options=temporalValues&limit=2&count=true"
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.header("ngsild-results-count"), Some("5"));
    let list = r.body.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["id"], "urn:ngsi-ld:Spot:0");
    assert_eq!(list[1]["occupancy"]["values"][2][0], json!(12));
    let links: Vec<&str> = r
        .headers
        .get_all("link")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let next = links.join(", ");
    let url = links
        .iter()
        .find(|l| l.contains("rel=\"next\""))
        .and_then(|l| l.strip_prefix('<'))
        .and_then(|l| l.split('>').next())
        .unwrap();
    let page = app.get(url).await;
    assert_eq!(page.status, StatusCode::OK, "{url}");
    assert_eq!(page.body[0]["id"], "urn:ngsi-ld:Spot:2");
    assert!(
        next.contains("offset=2") && next.contains("rel=\"next\""),
        "{next}"
    );
    // q is checked against the current state: only Spot:3 has one.
    app.json(
        Method::POST,
        "/ngsi-ld/v1/entities",
        &json!({"id": "urn:ngsi-ld:Spot:3", "type": "ParkingSpot", "zone": {"type": "Property", "value": "north"}}),
    )
    .await;
    let r = app
        .get(&format!(
            "{T}?type=ParkingSpot&q=zone==%22north%22&attrs=occupancy"
        ))
        .await;
    let ids: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["urn:ngsi-ld:Spot:3"]);
    // The POST form with temporalQ.
    let r = app
        .json(
            Method::POST,
            "/ngsi-ld/v1/temporal/entityOperations/query?options=aggregatedValues",
            &json!({"type": "Query", "entities": [{"type": "Streetlight"}],
                    "temporalQ": {"timerel": "after", "timeAt": "2024-12-31T00:00:00Z", "aggrMethods": "totalCount"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body[0]["power"]["totalCount"][0][0], json!(1));
    assert_eq!(
        app.get(&format!("{T}?options=temporalValues"))
            .await
            .problem(),
        "BadRequestData"
    );
}

#[tokio::test]
async fn temporal_writes_create_append_modify_and_delete() {
    let app = TestApp::new();
    let body = json!({
        "id": "urn:ngsi-ld:Bin:1", "type": "WasteContainer",
        "fillingLevel": [
            {"type": "Property", "value": 0.1, "observedAt": "2025-03-01T08:00:00Z"},
            {"type": "Property", "value": 0.4, "observedAt": "2025-03-01T12:00:00Z"}
        ]
    });
    let r = app.json(Method::POST, T, &body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(
        r.header("location"),
        Some("/ngsi-ld/v1/temporal/entities/urn:ngsi-ld:Bin:1")
    );
    // Sent again, the same instances are not stored twice; a new one is added.
    assert_eq!(
        app.json(Method::POST, T, &body).await.status,
        StatusCode::NO_CONTENT
    );
    let mut again = body.clone();
    again["fillingLevel"][1]["value"] = json!(0.5);
    again["fillingLevel"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "Property", "value": 0.6, "observedAt": "2025-03-01T16:00:00Z"}));
    assert_eq!(
        app.json(Method::POST, T, &again).await.status,
        StatusCode::NO_CONTENT
    );
    let r = app
        .json(
            Method::POST,
            &format!("{T}/urn:ngsi-ld:Bin:1/attrs"),
            &json!({"temperature": {"type": "Property", "value": 12, "observedAt": "2025-03-01T09:00:00Z"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    let r = app
        .get(&format!("{T}/urn:ngsi-ld:Bin:1?attrs=fillingLevel"))
        .await;
    let levels = r.body["fillingLevel"].as_array().unwrap();
    let pairs: Vec<(f64, &str)> = levels
        .iter()
        .map(|i| {
            (
                i["value"].as_f64().unwrap(),
                i["observedAt"].as_str().unwrap(),
            )
        })
        .collect();
    // 0.5 at noon differs in value from 0.4: both are kept.
    assert_eq!(
        pairs,
        vec![
            (0.1, "2025-03-01T08:00:00Z"),
            (0.4, "2025-03-01T12:00:00Z"),
            (0.5, "2025-03-01T12:00:00Z"),
            (0.6, "2025-03-01T16:00:00Z"),
        ],
        "{}",
        r.body
    );
    assert!(r.body.get("temperature").is_none());
    let first = levels[0]["instanceId"].as_str().unwrap().to_string();
    let r = app
        .json(
            Method::PATCH,
            &format!("{T}/urn:ngsi-ld:Bin:1/attrs/fillingLevel/{first}"),
            &json!({"type": "Property", "value": 0.15}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    let r = app
        .get(&format!("{T}/urn:ngsi-ld:Bin:1?attrs=fillingLevel"))
        .await;
    assert_eq!(r.body["fillingLevel"][0]["value"], json!(0.15));
    assert_eq!(
        r.body["fillingLevel"][0]["observedAt"],
        "2025-03-01T08:00:00Z"
    );
    let r = app
        .delete(&format!("{T}/urn:ngsi-ld:Bin:1/attrs/fillingLevel/{first}"))
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = app
        .delete(&format!("{T}/urn:ngsi-ld:Bin:1/attrs/fillingLevel/{first}"))
        .await;
    assert_eq!(r.problem(), "ResourceNotFound");
    let r = app
        .get(&format!("{T}/urn:ngsi-ld:Bin:1?attrs=fillingLevel"))
        .await;
    assert_eq!(r.body["fillingLevel"].as_array().unwrap().len(), 3);
    assert_eq!(
        app.delete(&format!("{T}/urn:ngsi-ld:Bin:1/attrs/temperature"))
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    let r = app.get(&format!("{T}/urn:ngsi-ld:Bin:1")).await;
    assert!(r.body.get("temperature").is_none(), "{}", r.body);
    assert_eq!(
        app.delete(&format!("{T}/urn:ngsi-ld:Bin:1")).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.get(&format!("{T}/urn:ngsi-ld:Bin:1")).await.problem(),
        "ResourceNotFound"
    );
    let r = app
        .json(
            Method::POST,
            &format!("{T}/urn:ngsi-ld:Bin:1/attrs"),
            &json!({"temperature": {"type": "Property", "value": 1}}),
        )
        .await;
    assert_eq!(r.problem(), "ResourceNotFound");
}

#[tokio::test]
async fn bad_temporal_input_is_refused_with_reasons() {
    let app = TestApp::new();
    import(&app, format!("urn:ngsi-ld:S:1,Sensor,t,{},1\n", at(0))).await;
    let base = format!("{T}/urn:ngsi-ld:S:1");
    for (query, expect) in [
        ("timerel=after", "needs timeAt"),
        (
            "timerel=between&timeAt=2025-01-02T00:00:00Z&endTimeAt=2025-01-01T00:00:00Z",
            "later than timeAt",
        ),
        (
            "timerel=between&timeAt=2025-01-01T00:00:00Z",
            "needs endTimeAt",
        ),
        (
            "timerel=during&timeAt=2025-01-01T00:00:00Z",
            "not one of before",
        ),
        ("timeAt=2025-01-01T00:00:00Z", "need timerel"),
        ("timerel=after&timeAt=tomorrow", "not an ISO 8601 date-time"),
        (
            "options=aggregatedValues&aggrMethods=median",
            "'median' is not one of",
        ),
        ("options=aggregatedValues", "needs aggrMethods"),
        (
            "options=aggregatedValues&aggrMethods=avg&aggrPeriodDuration=P1X",
            "not an ISO 8601 duration",
        ),
        (
            "options=aggregatedValues&aggrMethods=avg&aggrPeriodDuration=1D",
            "not an ISO 8601 duration",
        ),
        ("aggrMethods=avg", "need options=aggregatedValues"),
        ("lastN=0", "lastN must be between"),
        ("lastN=100001", "lastN must be between"),
        ("lastN=ten", "lastN must be a positive integer"),
        (
            "timeproperty=removedAt",
            "timeproperty 'removedAt' is not one of",
        ),
        (
            "options=temporalValues,aggregatedValues&aggrMethods=avg",
            "cannot be combined",
        ),
    ] {
        let r = app.get(&format!("{base}?{query}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{query}: {}", r.body);
        assert_eq!(r.problem(), "BadRequestData", "{query}");
        let detail = r.body["detail"].as_str().unwrap();
        assert!(
            detail.contains(expect),
            "{query}: '{detail}' should say '{expect}'"
        );
    }
    // Values a parameter cannot take are invalid requests.
    for (query, expect) in [
        ("format=keyValues", "unknown format 'keyValues'"),
        ("options=keyValues", "unknown option 'keyValues'"),
        ("lastN=1&colour=red", "unknown query parameter 'colour'"),
    ] {
        let r = app.get(&format!("{base}?{query}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{query}: {}", r.body);
        assert_eq!(r.problem(), "InvalidRequest", "{query}");
        assert!(
            r.body["detail"].as_str().unwrap().contains(expect),
            "{}",
            r.body
        );
    }
    let r = import(
        &app,
        format!(
            "urn:ngsi-ld:S:1,Sensor,t,{},2\nurn:ngsi-ld:S:1,Sensor,t,noon,3\n",
            at(15)
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.body["detail"].as_str().unwrap().contains("line 2"),
        "{}",
        r.body
    );
    let r = import(&app, "just,three,fields\n".into()).await;
    assert!(
        r.body["detail"].as_str().unwrap().contains("line 1"),
        "{}",
        r.body
    );
    let r = import(&app, format!("not a uri,Sensor,t,{},2\n", at(0))).await;
    assert_eq!(r.problem(), "BadRequestData");
    let r = app
        .send(
            Method::POST,
            "/api/v1/history/import",
            &[("content-type", "application/json")],
            Some("{}".into()),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let r = app
        .json(
            Method::PATCH,
            &format!("{base}/attrs/t/not%20a%20uri"),
            &json!({"type": "Property", "value": 1}),
        )
        .await;
    assert_eq!(r.problem(), "BadRequestData");
    assert!(
        r.body["detail"].as_str().unwrap().contains("instanceId"),
        "{}",
        r.body
    );
    // Refused input changed nothing: the import stopped before its batch was written.
    let r = app.get(&format!("{base}?options=temporalValues")).await;
    assert_eq!(
        r.body["t"]["values"].as_array().unwrap().len(),
        1,
        "{}",
        r.body
    );
}

#[tokio::test]
async fn long_histories_are_cut_with_a_content_range() {
    let app = TestApp::new();
    let n = 10_050;
    let csv: String = (0..n)
        .map(|i| format!("urn:ngsi-ld:S:1,Sensor,t,{},{i}\n", at(i)))
        .collect();
    let r = import(&app, csv).await;
    assert_eq!(r.body["points"], json!(n));
    let r = app
        .get(&format!("{T}/urn:ngsi-ld:S:1?options=temporalValues"))
        .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    let values = r.body["t"]["values"].as_array().unwrap();
    assert_eq!(values.len(), 10_000);
    assert_eq!(values[0][0], json!(0));
    assert_eq!(values[9_999][0], json!(9_999));
    assert_eq!(
        r.header("content-range"),
        Some("date-time 2025-01-01T00:00:00Z-2025-01-07T22:39:00Z/*")
    );
    // The next part: after the last instance returned.
    let r = app
        .get(&format!(
            "{T}/urn:ngsi-ld:S:1?options=temporalValues&timerel=after&timeAt=2025-01-07T22:40:00Z"
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["t"]["values"].as_array().unwrap().len(), 50);
    let r = app
        .get(&format!(
            "{T}/urn:ngsi-ld:S:1?options=temporalValues&lastN=3"
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["t"]["values"][2][0], json!(n - 1));
}

#[tokio::test]
async fn retention_drops_old_history_per_type() {
    let app = TestApp::new();
    let now_ms = chrono::Utc::now().timestamp_millis();
    let old = now_ms - 40 * 86_400_000;
    let recent = now_ms - 3_600_000;
    let csv = format!(
        "urn:ngsi-ld:A:1,AirQualityObserved,no2,{old},40\nurn:ngsi-ld:A:1,AirQualityObserved,no2,{recent},41\n\
         urn:ngsi-ld:W:1,WaterMeter,volume,{old},1\nurn:ngsi-ld:W:1,WaterMeter,volume,{recent},2\n"
    );
    assert_eq!(import(&app, csv).await.status, StatusCode::OK);
    let r = app
        .json(
            Method::PUT,
            "/api/v1/history/retention",
            &json!({"types": {"AirQualityObserved": "P30D"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    let r = app.get("/api/v1/history/retention").await;
    assert_eq!(
        r.body,
        json!({"default": null, "types": {"AirQualityObserved": "P30D"}})
    );
    let r = app
        .get(&format!("{T}/urn:ngsi-ld:A:1?options=temporalValues"))
        .await;
    assert_eq!(
        r.body["no2"]["values"].as_array().unwrap().len(),
        1,
        "{}",
        r.body
    );
    assert_eq!(r.body["no2"]["values"][0][0], json!(41));
    let r = app
        .get(&format!("{T}/urn:ngsi-ld:W:1?options=temporalValues"))
        .await;
    assert_eq!(r.body["volume"]["values"].as_array().unwrap().len(), 2);
    let r = app
        .json(
            Method::PUT,
            "/api/v1/history/retention",
            &json!({"default": "P1M"}),
        )
        .await;
    assert_eq!(r.problem(), "BadRequestData");
    let r = app
        .json(
            Method::PUT,
            "/api/v1/history/retention",
            &json!({"forever": true}),
        )
        .await;
    assert_eq!(r.problem(), "BadRequestData");
}

#[tokio::test]
async fn history_survives_a_restart() {
    let app = TestApp::new();
    let csv: String = (0..100)
        .map(|i| format!("urn:ngsi-ld:S:1,Sensor,t,{},{i}\n", at(i)))
        .collect();
    import(&app, csv).await;
    for i in 0..3 {
        app.json(
            Method::POST,
            "/ngsi-ld/v1/entityOperations/upsert",
            &json!([{"id": "urn:ngsi-ld:S:1", "type": "Sensor",
                     "t": {"type": "Property", "value": 1000 + i, "observedAt": format!("2025-02-01T00:0{i}:00Z")}}]),
        )
        .await;
    }
    let app = app.restart().await;
    let r = app
        .get(&format!(
            "{T}/urn:ngsi-ld:S:1?options=aggregatedValues&aggrMethods=totalCount,max"
        ))
        .await;
    assert_eq!(r.body["t"]["totalCount"][0][0], json!(103), "{}", r.body);
    assert_eq!(r.body["t"]["max"][0][0], json!(1002.0));
}

/// `POST /temporal/entities` with the given attributes.
async fn create_temporal(app: &TestApp, id: &str, ty: &str, attrs: serde_json::Value) {
    let mut body = json!({"id": id, "type": ty});
    for (k, v) in attrs.as_object().unwrap() {
        body[k] = v.clone();
    }
    let r = app.json(Method::POST, T, &body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
}

fn ids(r: &crate::common::Resp) -> Vec<&str> {
    r.body
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {}", r.body))
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn instance_times_come_back_as_they_were_given() {
    let app = TestApp::new();
    create_temporal(
        &app,
        "urn:ngsi-ld:S:1",
        "Sensor",
        json!({
            "t": [
                {"type": "Property", "value": 1, "observedAt": "2026-01-01T10:00:00Z"},
                {"type": "Property", "value": 2, "observedAt": "2026-01-01T10:00:00.5Z",
                 "accuracy": {"type": "Property", "value": 0.1, "observedAt": "2026-01-01T10:00:00.25Z"}},
                {"type": "Property", "value": 3, "observedAt": "2026-01-01T10:00:01.123Z"},
                {"type": "Property", "value": 4, "observedAt": "2026-01-01T11:00:02.000001+01:00"}
            ],
            "note": {"type": "Property", "value": "x",
                     "createdAt": "2026-01-01T09:00:00Z", "modifiedAt": "2026-01-01T09:30:00.75Z"}
        }),
    )
    .await;
    let r = app
        .get(&format!("{T}/urn:ngsi-ld:S:1?options=sysAttrs"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let t = r.body["t"].as_array().unwrap();
    let observed: Vec<&str> = t
        .iter()
        .map(|i| i["observedAt"].as_str().unwrap())
        .collect();
    assert_eq!(
        observed,
        vec![
            "2026-01-01T10:00:00Z",
            "2026-01-01T10:00:00.5Z",
            "2026-01-01T10:00:01.123Z",
            "2026-01-01T10:00:02.000001Z"
        ]
    );
    assert_eq!(t[1]["accuracy"]["observedAt"], "2026-01-01T10:00:00.25Z");
    assert_eq!(r.body["note"][0]["createdAt"], "2026-01-01T09:00:00Z");
    assert_eq!(r.body["note"][0]["modifiedAt"], "2026-01-01T09:30:00.75Z");
    // The simplified form, and an instance without observedAt at its modifiedAt.
    let r = app
        .get(&format!("{T}/urn:ngsi-ld:S:1?options=temporalValues"))
        .await;
    assert_eq!(
        r.body["t"]["values"],
        json!([
            [1, "2026-01-01T10:00:00Z"],
            [2, "2026-01-01T10:00:00.5Z"],
            [3, "2026-01-01T10:00:01.123Z"],
            [4, "2026-01-01T10:00:02.000001Z"]
        ])
    );
    assert_eq!(
        r.body["note"]["values"],
        json!([["x", "2026-01-01T09:30:00.75Z"]])
    );
    let r = app
        .get(&format!(
            "{T}/urn:ngsi-ld:S:1?options=temporalValues&attrs=note&timeproperty=modifiedAt&timerel=before&timeAt=2026-01-01T09:31:00Z"
        ))
        .await;
    assert_eq!(
        r.body["note"]["values"],
        json!([["x", "2026-01-01T09:30:00.75Z"]])
    );
    let r = app
        .json(
            Method::POST,
            &format!("{T}/urn:ngsi-ld:S:1/attrs"),
            &json!({"note": {"type": "Property", "value": "y", "modifiedAt": "yesterday"}}),
        )
        .await;
    assert_eq!(r.problem(), "BadRequestData");
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("modifiedAt of 'note' is not an ISO 8601 date-time"),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn deleted_at_is_a_time_property_without_instances() {
    let app = TestApp::new();
    create_temporal(
        &app,
        "urn:ngsi-ld:S:1",
        "Sensor",
        json!({"t": {"type": "Property", "value": 1, "observedAt": "2026-01-01T10:00:00Z"}}),
    )
    .await;
    let r = app
        .get(&format!(
            "{T}/urn:ngsi-ld:S:1?timeproperty=deletedAt&timerel=after&timeAt=2020-01-01T00:00:00Z"
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, json!({"id": "urn:ngsi-ld:S:1", "type": "Sensor"}));
    let r = app
        .get(&format!(
            "{T}?type=Sensor&timeproperty=deletedAt&timerel=after&timeAt=2020-01-01T00:00:00Z&options=aggregatedValues&aggrMethods=totalCount"
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, json!([]));
}

#[tokio::test]
async fn queries_leave_out_entities_without_instances_in_the_window() {
    let app = TestApp::new();
    for (id, at, attr) in [
        ("urn:ngsi-ld:S:1", "2026-01-01T10:00:00Z", "t"),
        ("urn:ngsi-ld:S:2", "2026-01-03T10:00:00Z", "t"),
        ("urn:ngsi-ld:S:3", "2026-01-03T11:00:00Z", "h"),
        ("urn:ngsi-ld:S:4", "2026-01-04T10:00:00Z", "t"),
    ] {
        create_temporal(
            &app,
            id,
            "Sensor",
            json!({attr: {"type": "Property", "value": 1, "observedAt": at}}),
        )
        .await;
    }
    let window = "timerel=between&timeAt=2026-01-02T00:00:00Z&endTimeAt=2026-01-04T00:00:00Z";
    let r = app
        .get(&format!("{T}?type=Sensor&{window}&count=true"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(ids(&r), vec!["urn:ngsi-ld:S:2", "urn:ngsi-ld:S:3"]);
    assert_eq!(r.header("ngsild-results-count"), Some("2"));
    // attrs: an instance of one of them in the window.
    let r = app.get(&format!("{T}?type=Sensor&{window}&attrs=t")).await;
    assert_eq!(ids(&r), vec!["urn:ngsi-ld:S:2"]);
    // Pages are made of the entities that remain.
    let r = app
        .get(&format!(
            "{T}?type=Sensor&timerel=after&timeAt=2026-01-02T00:00:00Z&limit=2&count=true"
        ))
        .await;
    assert_eq!(ids(&r), vec!["urn:ngsi-ld:S:2", "urn:ngsi-ld:S:3"]);
    assert_eq!(r.header("ngsild-results-count"), Some("3"));
    let r = app
        .get(&format!(
            "{T}?type=Sensor&timerel=after&timeAt=2026-01-02T00:00:00Z&limit=2&offset=2"
        ))
        .await;
    assert_eq!(ids(&r), vec!["urn:ngsi-ld:S:4"]);
    let r = app
        .json(
            Method::POST,
            "/ngsi-ld/v1/temporal/entityOperations/query?options=aggregatedValues",
            &json!({"type": "Query", "entities": [{"type": "Sensor"}],
                    "temporalQ": {"timerel": "before", "timeAt": "2026-01-02T00:00:00Z", "aggrMethods": "totalCount"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(ids(&r), vec!["urn:ngsi-ld:S:1"]);
    assert_eq!(
        r.body[0]["t"]["totalCount"],
        json!([[1, "2026-01-01T10:00:00Z", "2026-01-02T00:00:00Z"]])
    );
    // Retrieving one entity still answers it, without attributes.
    let r = app.get(&format!("{T}/urn:ngsi-ld:S:1?{window}")).await;
    assert_eq!(r.body, json!({"id": "urn:ngsi-ld:S:1", "type": "Sensor"}));
}

#[tokio::test]
async fn q_and_geo_apply_to_entities_that_exist_only_in_history() {
    let app = TestApp::new();
    create_temporal(
        &app,
        "urn:ngsi-ld:Bus:1",
        "Bus",
        json!({
            "zone": [
                {"type": "Property", "value": "south", "observedAt": "2026-01-01T08:00:00Z"},
                {"type": "Property", "value": "north", "observedAt": "2026-01-01T09:00:00Z"}
            ],
            "location": [
                {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [2.35, 48.85]}, "observedAt": "2026-01-01T09:00:00Z"},
                {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [4.83, 45.76]}, "observedAt": "2026-01-01T08:00:00Z"}
            ]
        }),
    )
    .await;
    create_temporal(
        &app,
        "urn:ngsi-ld:Bus:2",
        "Bus",
        json!({
            "zone": {"type": "Property", "value": "south", "observedAt": "2026-01-01T09:00:00Z"},
            "location": {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [4.83, 45.76]}, "observedAt": "2026-01-01T09:00:00Z"}
        }),
    )
    .await;
    let r = app.get(&format!("{T}?type=Bus&q=zone==%22north%22")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(ids(&r), vec!["urn:ngsi-ld:Bus:1"]);
    // The latest instance counts: Bus:1 was in the south before.
    let r = app.get(&format!("{T}?type=Bus&q=zone==%22south%22")).await;
    assert_eq!(ids(&r), vec!["urn:ngsi-ld:Bus:2"]);
    // Near Paris (the latest location of Bus:1, though listed first).
    let r = app
        .get(&format!(
            "{T}?type=Bus&georel=near;maxDistance==10000&geometry=Point&coordinates=[2.35,48.86]"
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(ids(&r), vec!["urn:ngsi-ld:Bus:1"]);
    let r = app
        .json(
            Method::POST,
            "/ngsi-ld/v1/temporal/entityOperations/query",
            &json!({"type": "Query", "entities": [{"type": "Bus"}], "q": "zone==\"south\"",
                    "geoQ": {"georel": "near;maxDistance==10000", "geometry": "Point", "coordinates": [4.83, 45.77]}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(ids(&r), vec!["urn:ngsi-ld:Bus:2"]);
    // A current entity still decides by its current state.
    let r = app
        .json(
            Method::POST,
            "/ngsi-ld/v1/entities",
            &json!({"id": "urn:ngsi-ld:Bus:2", "type": "Bus", "zone": {"type": "Property", "value": "north"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = app.get(&format!("{T}?type=Bus&q=zone==%22north%22")).await;
    assert_eq!(ids(&r), vec!["urn:ngsi-ld:Bus:1", "urn:ngsi-ld:Bus:2"]);
}

#[tokio::test]
async fn simplified_values_of_language_json_and_vocab_properties() {
    let app = TestApp::new();
    create_temporal(
        &app,
        "urn:ngsi-ld:Shop:1",
        "Shop",
        json!({
            "name": [
                {"type": "LanguageProperty", "languageMap": {"en": "Bakery", "fr": "Boulangerie"}, "observedAt": "2026-01-01T08:00:00Z"},
                {"type": "LanguageProperty", "languageMap": {"en": "Cafe"}, "observedAt": "2026-01-02T08:00:00Z"}
            ],
            "config": {"type": "JsonProperty", "json": {"open": [8, 18]}, "observedAt": "2026-01-01T08:00:00Z"},
            "state": {"type": "VocabProperty", "vocab": "Open", "observedAt": "2026-01-01T08:00:00Z"},
            "owner": {"type": "Relationship", "object": "urn:ngsi-ld:Person:1", "observedAt": "2026-01-01T08:00:00Z"}
        }),
    )
    .await;
    let r = app
        .get(&format!("{T}/urn:ngsi-ld:Shop:1?format=temporalValues"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.body,
        json!({
            "id": "urn:ngsi-ld:Shop:1", "type": "Shop",
            "name": {"type": "LanguageProperty", "languageMaps": [
                [{"en": "Bakery", "fr": "Boulangerie"}, "2026-01-01T08:00:00Z"],
                [{"en": "Cafe"}, "2026-01-02T08:00:00Z"]
            ]},
            "config": {"type": "JsonProperty", "jsons": [[{"open": [8, 18]}, "2026-01-01T08:00:00Z"]]},
            "state": {"type": "VocabProperty", "vocabs": [["Open", "2026-01-01T08:00:00Z"]]},
            "owner": {"type": "Relationship", "objects": [["urn:ngsi-ld:Person:1", "2026-01-01T08:00:00Z"]]}
        })
    );
}

#[tokio::test]
async fn format_temporal_values_with_aggregated_values_answers_the_aggregation() {
    let app = TestApp::new();
    let csv: String = [3, 4, 5]
        .iter()
        .enumerate()
        .map(|(i, v)| format!("urn:ngsi-ld:M:1,Meter,energy,{},{v}\n", at(i as i64 * 60)))
        .collect();
    assert_eq!(import(&app, csv).await.status, StatusCode::OK);
    let window = "timerel=between&timeAt=2025-01-01T00:00:00Z&endTimeAt=2025-01-01T03:00:00.5Z";
    let expected = json!([[12.0, "2025-01-01T00:00:00Z", "2025-01-01T03:00:00.5Z"]]);
    let r = app
        .get(&format!(
            "{T}/urn:ngsi-ld:M:1?format=temporalValues&options=aggregatedValues&aggrMethods=sum&{window}"
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["energy"]["sum"], expected);
    assert!(r.body["energy"].get("values").is_none(), "{}", r.body);
    let r = app
        .get(&format!(
            "{T}?type=Meter&format=aggregatedValues&options=temporalValues&aggrMethods=sum&{window}"
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body[0]["energy"]["sum"], expected);
}

#[tokio::test]
async fn the_instance_page_size_is_configurable() {
    let app = TestApp::with_config(borough_api::ApiConfig {
        temporal_page_instances: 3,
        ..borough_api::ApiConfig::default()
    });
    let csv: String = (0..5)
        .map(|i| format!("urn:ngsi-ld:S:1,Sensor,t,{},{i}\n", at(i)))
        .collect();
    assert_eq!(import(&app, csv).await.status, StatusCode::OK);
    let r = app
        .get(&format!("{T}/urn:ngsi-ld:S:1?options=temporalValues"))
        .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{}", r.body);
    assert_eq!(
        r.body["t"]["values"],
        json!([
            [0, "2025-01-01T00:00:00Z"],
            [1, "2025-01-01T00:01:00Z"],
            [2, "2025-01-01T00:02:00Z"]
        ])
    );
    assert_eq!(
        r.header("content-range"),
        Some("date-time 2025-01-01T00:00:00Z-2025-01-01T00:02:00Z/*")
    );
    let r = app
        .get(&format!("{T}?type=Sensor&options=temporalValues"))
        .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{}", r.body);
    assert_eq!(r.body[0]["t"]["values"].as_array().unwrap().len(), 3);
    let r = app
        .get(&format!(
            "{T}/urn:ngsi-ld:S:1?options=temporalValues&timerel=after&timeAt=2025-01-01T00:03:00Z"
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["t"]["values"].as_array().unwrap().len(), 2);
    let r = app.get(&format!("{T}/urn:ngsi-ld:S:1?lastN=4")).await;
    assert_eq!(r.problem(), "BadRequestData");
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("lastN must be between 1 and 3"),
        "{}",
        r.body
    );
    let r = app
        .get(&format!(
            "{T}/urn:ngsi-ld:S:1?options=temporalValues&lastN=3"
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["t"]["values"][2][0], json!(4));
}

#[tokio::test]
async fn sending_stored_instances_again_adds_nothing() {
    let app = TestApp::new();
    // Imported points are sealed into chunks at once: compared there too.
    let csv: String = (0..3)
        .map(|i| format!("urn:ngsi-ld:S:1,Sensor,t,{},{}\n", at(i), i * 10))
        .collect();
    assert_eq!(import(&app, csv).await.status, StatusCode::OK);
    let r = app
        .json(
            Method::POST,
            T,
            &json!({"id": "urn:ngsi-ld:S:1", "type": "Sensor", "t": [
                {"type": "Property", "value": 10, "observedAt": "2025-01-01T00:01:00Z"},
                {"type": "Property", "value": 20.0, "observedAt": "2025-01-01T00:02:00Z"},
                {"type": "Property", "value": 30, "observedAt": "2025-01-01T00:03:00Z"},
                {"type": "Property", "value": 30, "observedAt": "2025-01-01T00:03:00Z"},
                {"type": "Property", "value": 99, "observedAt": "2025-01-01T00:00:00Z"}
            ]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    let r = app
        .get(&format!("{T}/urn:ngsi-ld:S:1?options=temporalValues"))
        .await;
    assert_eq!(
        r.body["t"]["values"],
        json!([
            [0, "2025-01-01T00:00:00Z"],
            [99, "2025-01-01T00:00:00Z"],
            [10, "2025-01-01T00:01:00Z"],
            [20, "2025-01-01T00:02:00Z"],
            [30, "2025-01-01T00:03:00Z"]
        ])
    );
}

#[tokio::test]
async fn unknown_instance_ids_are_not_found() {
    let app = TestApp::new();
    create_temporal(
        &app,
        "urn:ngsi-ld:S:1",
        "Sensor",
        json!({"t": {"type": "Property", "value": 1, "observedAt": "2026-01-01T10:00:00Z"}}),
    )
    .await;
    let r = app.get(&format!("{T}/urn:ngsi-ld:S:1")).await;
    let known = r.body["t"][0]["instanceId"].as_str().unwrap().to_string();
    let base = format!("{T}/urn:ngsi-ld:S:1/attrs/t");
    for unknown in [
        "urn:ngsi-ld:instance:zz",
        "urn:ngsi-ld:instance:1-0-ffff",
        "urn:ngsi-ld:instance:ffff-0-1",
        "urn:ngsi-ld:Instance:elsewhere",
    ] {
        let r = app.delete(&format!("{base}/{unknown}")).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{unknown}: {}", r.body);
        assert_eq!(r.problem(), "ResourceNotFound");
        let r = app
            .json(
                Method::PATCH,
                &format!("{base}/{unknown}"),
                &json!({"type": "Property", "value": 2}),
            )
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{unknown}: {}", r.body);
        assert_eq!(r.problem(), "ResourceNotFound");
    }
    // A known instance of another attribute or entity is not found either.
    let r = app
        .delete(&format!("{T}/urn:ngsi-ld:S:1/attrs/h/{known}"))
        .await;
    assert_eq!(r.problem(), "ResourceNotFound");
    let r = app
        .delete(&format!("{T}/urn:ngsi-ld:S:2/attrs/t/{known}"))
        .await;
    assert_eq!(r.problem(), "ResourceNotFound");
    assert_eq!(
        app.delete(&format!("{base}/{known}")).await.status,
        StatusCode::NO_CONTENT
    );
}

#[tokio::test]
async fn options_count_gives_the_results_count() {
    let app = TestApp::new();
    for i in 0..3 {
        create_temporal(
            &app,
            &format!("urn:ngsi-ld:S:{i}"),
            "Sensor",
            json!({"t": {"type": "Property", "value": i, "observedAt": "2026-01-01T10:00:00Z"}}),
        )
        .await;
    }
    let r = app
        .get(&format!("{T}?type=Sensor&options=count&limit=1"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.header("ngsild-results-count"), Some("3"));
    assert_eq!(ids(&r), vec!["urn:ngsi-ld:S:0"]);
    let r = app
        .get(&format!(
            "{T}?type=Sensor&options=temporalValues,count&limit=0"
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.header("ngsild-results-count"), Some("3"));
    assert_eq!(r.body, json!([]));
    let r = app
        .json(
            Method::POST,
            "/ngsi-ld/v1/temporal/entityOperations/query?options=count",
            &json!({"type": "Query", "entities": [{"type": "Sensor"}]}),
        )
        .await;
    assert_eq!(r.header("ngsild-results-count"), Some("3"));
    let r = app.get(&format!("{T}?type=Sensor")).await;
    assert_eq!(r.header("ngsild-results-count"), None);
}

#[tokio::test]
async fn pick_and_omit_project_temporal_answers() {
    let app = TestApp::new();
    create_temporal(
        &app,
        "urn:ngsi-ld:S:1",
        "Sensor",
        json!({
            "temperature": {"type": "Property", "value": 20, "observedAt": "2026-01-01T10:00:00Z"},
            "humidity": {"type": "Property", "value": 60, "observedAt": "2026-01-01T10:00:00Z"},
            "status": {"type": "Property", "value": "ok", "observedAt": "2026-01-01T10:00:00Z"}
        }),
    )
    .await;
    let r = app
        .get(&format!(
            "{T}/urn:ngsi-ld:S:1?pick=id,temperature&options=temporalValues"
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.body,
        json!({"id": "urn:ngsi-ld:S:1",
               "temperature": {"type": "Property", "values": [[20, "2026-01-01T10:00:00Z"]]}})
    );
    let r = app
        .get(&format!(
            "{T}?type=Sensor&omit=humidity,status&options=temporalValues"
        ))
        .await;
    assert_eq!(
        r.body,
        json!([{"id": "urn:ngsi-ld:S:1", "type": "Sensor",
                "temperature": {"type": "Property", "values": [[20, "2026-01-01T10:00:00Z"]]}}])
    );
    let r = app
        .get(&format!("{T}?type=Sensor&omit=id,temperature,humidity"))
        .await;
    let keys: Vec<&String> = r.body[0].as_object().unwrap().keys().collect();
    assert_eq!(keys, vec!["type", "status"], "{}", r.body);
    let r = app
        .json(
            Method::POST,
            "/ngsi-ld/v1/temporal/entityOperations/query?pick=type,humidity&options=temporalValues",
            &json!({"type": "Query", "entities": [{"type": "Sensor"}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.body,
        json!([{"type": "Sensor",
                "humidity": {"type": "Property", "values": [[60, "2026-01-01T10:00:00Z"]]}}])
    );
    // A pick that shows nothing of history still answers the entity.
    let r = app.get(&format!("{T}?type=Sensor&pick=id")).await;
    assert_eq!(r.body, json!([{"id": "urn:ngsi-ld:S:1"}]));
}
