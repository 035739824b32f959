# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "variables"];
if header :matches "x-spam-score" "*" {
  fileinto "score-${0}";
}
