# envelope: from=alice@example.org to=francois@example.fr message=messages/encoded.eml
require ["fileinto"];
if header :is "x-encoded" "äöü plain end" {
  fileinto "yes";
} else {
  fileinto "no";
}
