# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "relational"];
if header :value "ne" "x-spam-score" "7" {
  fileinto "yes";
} else {
  fileinto "no";
}
